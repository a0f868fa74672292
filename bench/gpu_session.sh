#!/usr/bin/env bash
# One GPU session's benchmarks, in stages that each fit one device call (< 10 min), results as JSON under $OUT.
#
#   bash bench/gpu_session.sh step      # issue 2: one PASD step, ours (512, 768) + the official PyTorch baseline
#   bash bench/gpu_session.sh sample1   # issue 3: end to end 512x1, 512x8, 768x1
#   bash bench/gpu_session.sh sample2   # issue 3: 768x4, 2048x1, 2048x1 with latent tiles
#   bash bench/gpu_session.sh train     # issue 5: training step throughput, remat off/on
#   bash bench/gpu_session.sh lcm       # issue 15: 4-step LCM vs 20-step UniPC end to end, 512 and 768, batch 1
#
# Before the session (here, with network): `bash bench/prepare_official.sh` for the baseline, and the wheels the GPU
# image lacks into .whl/ (ignored via .git/info/exclude), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl ml_collections tensorboardX grain array_record
# and carry `.whl` and `third_party/official_bench` with the call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
if [ -d third_party/official_bench/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/official_site \
    third_party/official_bench/wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

case "${1:-step}" in
  step)
    timeout 300 python3 bench/bench_step.py --model sd15 --sizes 512 768 --dtype bfloat16 --repeats 20 \
      --out "$OUT/step_ours.json" 2>&1 | tail -5
    PYTHONPATH=/tmp/official_site timeout 240 python3 bench/official_baseline.py --sizes 512 768 --dtype float16 \
      --repeats 10 --out "$OUT/step_official.json" 2>&1 | tail -5
    ;;
  sample1)
    timeout 560 python3 bench/bench_sample.py --model sd15 --dtype bfloat16 --cases 512x1 512x8 768x1 --isolate \
      --out "$OUT/sample1.json" 2>&1 | tail -20
    ;;
  sample2)
    timeout 560 python3 bench/bench_sample.py --model sd15 --dtype bfloat16 --cases 768x4 2048x1 2048x1:t160 \
      --isolate --out "$OUT/sample2.json" 2>&1 | tail -20
    ;;
  lcm)
    # random weights: only the speed is meaningful (the quality cost of 4 LCM steps needs the real LCM-LoRA)
    timeout 270 python3 bench/bench_sample.py --model sd15 --dtype bfloat16 --cases 512x1 768x1 --scheduler lcm \
      --steps 4 --out "$OUT/lcm4.json" 2>&1 | tail -10
    timeout 270 python3 bench/bench_sample.py --model sd15 --dtype bfloat16 --cases 512x1 768x1 --scheduler unipc \
      --steps 20 --out "$OUT/unipc20.json" 2>&1 | tail -10
    ;;
  train)
    timeout 560 python3 bench/bench_train.py --out "$OUT/train.json" 2>&1 | tail -20
    ;;
  *)
    echo "unknown stage $1"; exit 2 ;;
esac
