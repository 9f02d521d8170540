#!/usr/bin/env bash
# Build the "complete" evaluation venv (CUDA-wheel torch + torchvision + torchaudio + torchcodec + datasets + mteb).
# Why: datasets 5.x decodes audio with torchcodec and mteb's AudioCollator resamples with torchaudio; neither has a
# CPU-only wheel that loads next to torch 2.13.0+cpu, so mteb's audio tasks only run in this venv (CPU works fine).
# Idempotent: re-running skips what is already in place.
# Usage: training/evaluation/install_full_env.sh [VENV_DIR]   (default $VENV_FULL or <repo>/.venv-full; ~5.2 GB, ~4 min)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-${VENV_FULL:-$REPO/.venv-full}}"
PY="${PYTHON:-python3}"

# Debian ffmpeg: torchcodec loads the system FFmpeg libraries.
if ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg
  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg; fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"

# Bypass a local CPU-wheel folder so PyPI's (CUDA) torch 2.13.0 is resolved together with torchvision/torchaudio.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS
PIN_FILE="$VENV/.conan_full_env_pins"
PINS="torch==2.13.0 torchvision==0.28.0 torchaudio==2.11.0 torchcodec==0.17.0 datasets==5.2.0 mteb==2.26.24 \
transformers==5.23.0 sentence-transformers==6.2.0 accelerate==1.15.0 safetensors==0.8.0 peft==0.21.2 \
numpy==2.4.6 scipy==1.17.1 pillow==12.3.0 soundfile==0.14.0 av==18.1.0 pypdfium2==5.15.2 tqdm==4.70.1 \
pyyaml==6.0.3 pytest==9.2.0 scikit-learn==1.9.1 matplotlib==3.11.2 emoji==2.16.0"
if [ -f "$PIN_FILE" ] && [ "$(cat "$PIN_FILE")" = "$PINS" ]; then
  echo "full env at $VENV already has: $PINS"
else
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --disable-pip-version-check $PINS
  echo "$PINS" > "$PIN_FILE"
fi
"$VENV/bin/python" - <<'PY'
import torch, torchaudio, torchcodec, torchvision, datasets, mteb
from torchcodec.decoders import AudioDecoder  # fails here if FFmpeg / CUDA libs are missing
print("full env ok: torch", torch.__version__, "torchaudio", torchaudio.__version__, "torchvision",
      torchvision.__version__, "torchcodec", torchcodec.__version__, "datasets", datasets.__version__, "mteb", mteb.__version__)
PY
echo "run the full-env tests with: cd $REPO && $VENV/bin/python -m pytest tests/evaluation/test_mteb_encoder.py -q"
