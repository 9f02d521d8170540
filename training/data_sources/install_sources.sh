#!/usr/bin/env bash
# Installs every registry-provided real-data source the builders in training/data_sources/ read.
# Idempotent: apt and pip skip what is already installed. Keep in sync with install.py (a test checks).
# Usage: training/data_sources/install_sources.sh [PYTHON]   (PYTHON defaults to python3; run as root for apt)
set -euo pipefail
PY="${1:-python3}"
APT_PACKAGES="fonts-noto-color-emoji r-doc-pdf octave-doc wordnet-base espeak-ng fluidsynth fluid-soundfont-gm"
PIP_PACKAGES="emoji==2.16.0 pypdfium2==5.15.2 soundfile==0.14.0 av==18.1.0"

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
