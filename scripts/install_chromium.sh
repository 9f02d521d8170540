#!/usr/bin/env bash
# Debian's headless Chromium for the demo's browser test (tests/demo/test_demo_browser.py drives it with Playwright via
# executable_path; `playwright install` would download a browser and is not used). Idempotent; root or sudo needed.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
if dpkg -s chromium >/dev/null 2>&1; then
  echo "apt: chromium already installed"
else
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends chromium
fi
