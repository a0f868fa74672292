#!/usr/bin/env bash
# Assemble the git-ignored folder that bench/official_baseline.py imports the official PASD from.
#   MIRROR=<checkout or bare mirror of github.com/yangxy/PASD> SD15=<folder with the SD1.5 config files> \
#     bash bench/prepare_official.sh
# Nothing here is committed: third_party/ is in .gitignore. On the GPU machine, install the wheels with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site third_party/official_bench/wheels/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MIRROR:?set MIRROR to a yangxy/PASD checkout or mirror}"
: "${SD15:?set SD15 to a folder with unet/ vae/ scheduler/ ... config files}"
dst=third_party/official_bench
rm -rf "$dst" && mkdir -p "$dst/wheels"
git -C "$MIRROR" archive HEAD pasd/models | tar -x -C "$dst"
touch "$dst/pasd/__init__.py"
cp -r "$SD15" "$dst/sd15_configs"
python3 -m pip download -q --no-deps -d "$dst/wheels" diffusers==0.29.2 huggingface_hub==0.25.2 importlib_metadata
echo "ready: $dst"
