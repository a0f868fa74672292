"""pasd-sample on JAX's multi-controller runtime: 2 processes x 2 CPU devices write exactly the files that one
process with 2 devices writes, bit for bit, each file by one process, and one merged summary.json.

Both runs use the real tiny PASD checkpoint through the CLI, launched as train.py's two-process test launches
(coordinator address, process count and id as flags; gloo for the CPU collective of the summary)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 6

pytestmark = pytest.mark.slow  # two CLI runs that compile the tiny pipeline: about a minute on 2 cores


def _env(cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_write_what_one_process_writes(golden_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(src / f"img{i}.png")
    cache = tmp_path / "xla"
    command = [sys.executable, "-m", "pasd_jax.sampling.cli", "--ckpt", str(golden_dir / "tiny_pasd"), "--base",
               str(golden_dir / "tiny_pipeline"), "--input", str(src), "--process-size", "64", "--steps", "2",
               "--dtype", "float32", "--no-cache", "--no-progress", "--compile-cache", str(cache)]
    one = subprocess.run(command + ["--output", str(tmp_path / "one")], capture_output=True, text=True,
                         env=_env(cache), cwd=REPO, timeout=900, check=False)
    assert one.returncode == 0, one.stderr[-5000:]

    port = _free_port()
    multi = [*command, "--output", str(tmp_path / "two"), "--coordinator-address", f"localhost:{port}",
             "--num-processes", "2"]
    procs = [subprocess.Popen(multi + ["--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(cache), cwd=REPO) for i in range(2)]
    try:
        errs = [p.communicate(timeout=900)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-5000:]
    print(f"\none process:\n{one.stderr[-600:]}\nprocess 0 of 2:\n{errs[0][-600:]}")

    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == [f"img{i}.png" for i in range(N)]
    assert sorted(p.name for p in (tmp_path / "two").glob("*.png")) == names
    worst = 0
    for name in names:
        a = np.asarray(Image.open(tmp_path / "one" / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "two" / name)).astype(int)
        worst = max(worst, int(np.abs(a - b).max()))
    print(f"2 processes vs 1: max |diff| {worst} levels over {N} images")
    assert worst == 0  # the same per-image program on the same per-image inputs: bit-identical

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["written"] == N and summary["failed"] == 0
    assert sorted(summary["files"]["written"]) == names  # each file written once, by one of the two
    assert f"{N} written" in errs[0]    # process 0 prints the merged report
    assert f"{N // 2} written" in errs[1]  # process 1 its own share
