#!/usr/bin/env bash
# Installs every registry-provided real-data source the builders in training/data_sources/ read.
# Idempotent: apt and pip skip what is already installed. Keep in sync with install.py (a test checks).
# Usage: training/data_sources/install_sources.sh [PYTHON]   (PYTHON defaults to python3; run as root for apt)
set -euo pipefail
PY="${1:-python3}"
APT_PACKAGES="fonts-noto-color-emoji r-doc-pdf octave-doc wordnet-base espeak-ng fluidsynth fluid-soundfont-gm dict-gcide flite gnuplot-doc"
PIP_PACKAGES="emoji==2.16.0 pypdfium2==5.15.2 soundfile==0.14.0 av==18.1.0"
# Held-out evaluation only (Twemoji artwork); npm comes with Debian's nodejs/npm packages.
NPM_PACKAGES="emoji-datasource-twitter@16.0.0"
NPM_PREFIX="${CONAN_DATA_HOME:-$HOME/.cache/conan-embedding}/npm"

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
missing=""
for p in $APT_PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update
  # shellcheck disable=SC2086
  $SUDO apt-get install -y --no-install-recommends $missing
else
  echo "apt: all of $APT_PACKAGES already installed"
fi
# shellcheck disable=SC2086
"$PY" -m pip install -q $PIP_PACKAGES
# shellcheck disable=SC2086
if command -v npm >/dev/null 2>&1; then
  for p in $NPM_PACKAGES; do
    if [ -f "$NPM_PREFIX/node_modules/${p%@*}/package.json" ] && \
       grep -q "\"version\": \"${p##*@}\"" "$NPM_PREFIX/node_modules/${p%@*}/package.json"; then
      echo "npm: $p already installed in $NPM_PREFIX"
    else
      mkdir -p "$NPM_PREFIX"
      npm install --prefix "$NPM_PREFIX" --no-audit --no-fund "$p" || \
        echo "install_sources: npm install $p failed; the held-out Twemoji tasks will be skipped" >&2
    fi
  done
else
  echo "install_sources: npm not found; the held-out Twemoji tasks will be skipped ($NPM_PACKAGES)" >&2
fi
