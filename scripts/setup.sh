#!/usr/bin/env bash
# Create (or update) the project venv at .venv with pinned dependencies. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-dev.txt requirements-serving.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  # torch first and pinned, so nothing resolves a newer torch with CUDA wheels.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
# Real data sources from the Debian/PyPI registries (emoji font, PDF manuals, WordNet, espeak-ng, a SoundFont).
# Needs root or sudo for apt; without them the pipeline and tests skip those sources with a reason.
if [ "$(id -u)" = "0" ] || command -v sudo >/dev/null 2>&1; then
  bash training/data_sources/install_sources.sh .venv/bin/python
  bash scripts/install_chromium.sh   # the demo's browser test (tests/demo/test_demo_browser.py)
else
  echo "setup: no root/sudo; skipping Debian data sources and chromium (see training/data_sources/install_sources.sh," \
    "scripts/install_chromium.sh); the browser test will skip" >&2
fi
