#!/usr/bin/env bash
# End-to-end peak resident memory of pasd-sample at full SD1.5 size on CPU (bench/RESULTS.md "CPU step and memory").
#   bash bench/sample_cpu_memory.sh [workdir]      (default /tmp/pasd_e2e; needs ~12 GB of disk)
# Writes an official-layout PASD checkpoint and an SD base with random weights (bench_step.py --make-checkpoint /
# --make-base), a 128x128 input, then runs, each under /usr/bin/time -v with an empty converted-weight cache first:
#   first:   --upscale 4 --process-size 512 --steps 2   (converts and caches the official weights)
#   again:   the same command, all outputs exist         (must end before loading any weight)
#   default: --upscale 4 --steps 4, process size 768     (a 96x96 latent)
# and prints one JSON line per run (wall seconds, peak RSS in GiB, exit code).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/pasd_e2e}
mkdir -p "$work"
export JAX_PLATFORMS=cpu PASD_JAX_CACHE="$work/cache"
if [ ! -f "$work/ckpt/unet/diffusion_pytorch_model.safetensors" ]; then
  python bench/bench_step.py --model sd15 --make-checkpoint "$work/ckpt" --make-base "$work/base"
fi
python - "$work/in" <<'EOF'
import sys, pathlib, numpy as np
from PIL import Image
d = pathlib.Path(sys.argv[1]); d.mkdir(exist_ok=True)
y, x = np.mgrid[0:128, 0:128]
img = np.stack([x * 2, y * 2, (x + y) % 256], -1).astype(np.uint8)
Image.fromarray(img).save(d / "in128.png")
EOF
run() {  # name, then pasd-sample arguments
  local name=$1; shift
  local log="$work/$name.time"
  set +e
  /usr/bin/time -v -o "$log" python sample.py --ckpt "$work/ckpt" --base "$work/base" \
    --input "$work/in/in128.png" "$@" > "$work/$name.out" 2>&1
  local rc=$?
  set -e
  python - "$name" "$rc" "$log" <<'EOF'
import json, re, sys
name, rc, log = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read()
kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1))
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", log).group(1)
secs = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
print(json.dumps({"run": name, "exit": rc, "wall_s": round(secs, 1), "peak_rss_gib": round(kib / 2 ** 20, 2)}))
EOF
}
rm -rf "$work/cache" "$work/out512" "$work/out768"
run first --upscale 4 --process-size 512 --steps 2 --output "$work/out512"
run again --upscale 4 --process-size 512 --steps 2 --output "$work/out512"
run default --upscale 4 --steps 4 --output "$work/out768"
