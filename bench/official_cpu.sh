#!/usr/bin/env bash
# The CPU step comparison against the official PyTorch PASD, in one command (bench/RESULTS.md "CPU step and memory").
#   MIRROR=<checkout or bare mirror of github.com/yangxy/PASD> bash bench/official_cpu.sh [rounds] [sizes...]
# Assembles third_party/official_bench (git-ignored) from the mirror and the shipped SD1.5 configs if it is missing,
# makes sure the torch venv (.torchenv, git-ignored; or $PASD_OFFICIAL_PYTHON) has diffusers 0.29.2 and einops,
# then alternates fresh processes of our fp32 step and the official one on the same CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
shift || true
sizes=${*:-256 512}
py=${PASD_OFFICIAL_PYTHON:-.torchenv/bin/python}
dst=third_party/official_bench
if [ ! -d "$dst/pasd/models" ]; then
  : "${MIRROR:?set MIRROR to a yangxy/PASD checkout or mirror (third_party/official_bench is missing)}"
  mkdir -p "$dst"
  git -C "$MIRROR" archive HEAD pasd/models | tar -x -C "$dst"
  touch "$dst/pasd/__init__.py"
  rm -rf "$dst/sd15_configs" && cp -r pasd_jax/assets/sd15 "$dst/sd15_configs"
fi
"$py" -c "import torch, diffusers, einops" 2>/dev/null ||
  "$py" -m pip install -q diffusers==0.29.2 huggingface_hub==0.25.2 einops
export JAX_PLATFORMS=cpu JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/pasd_xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
# shellcheck disable=SC2086
python bench/bench_step.py --model sd15 --sizes $sizes --dtype float32 --repeats 3 --compare-official \
  --rounds "$rounds" --official-python "$py" --out "step_cpu_vs_official.json"
