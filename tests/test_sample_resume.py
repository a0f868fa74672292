"""pasd-sample stopped mid-folder (SIGTERM, SIGKILL, a signal while loading) and run again: every image ends up
written exactly once, none truncated, each equal to an uninterrupted run; summary.json says what happened.

The CLI runs for real in a subprocess (argument checks, plan, signals, summary.json, exit codes); only the weights
and the sampler are stand-ins (a key-dependent offset of the input, slowed down), so the test takes seconds.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pasd_jax.sampling.runner import RunSettings, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 10

WORKER = """
import os, sys, time
import jax, numpy as np
import pasd_jax.sampling.loading as loading
import pasd_jax.sampling.pipeline as pipeline
from pasd_jax.sampling import cli

DELAY, LOAD_DELAY = float(os.environ["FAKE_DELAY"]), float(os.environ.get("FAKE_LOAD_DELAY", "0"))

import pathlib, pasd_jax

class Loaded:
    models = params = tokenizer_dir = None
    scheduler_config = pathlib.Path(pasd_jax.__file__).parent / "assets" / "sd15" / "scheduler"
    variant, notes = "stand-in", ()

def load(*a, **k):
    print("LOADING", flush=True)
    time.sleep(LOAD_DELAY)
    return Loaded()

class Echo:
    def __init__(self, *a, **k):
        pass
    def sample(self, images, prompts, negative_prompts, keys, options, pad_to=None, on_step=None):
        time.sleep(DELAY)
        offsets = [int(jax.random.randint(k, (), 0, 50)) for k in keys]
        return np.stack([np.clip(i.astype(np.int32) + o, 0, 255).astype(np.uint8) for i, o in zip(images, offsets)])

loading.load_for_sampling = load
pipeline.PASDPipeline = Echo
sys.exit(cli.main(sys.argv[1:]))
"""


class Echo:
    """The worker's sampler, in-process: the reference an uninterrupted run writes."""

    def sample(self, images, prompts, negative_prompts, keys, options, pad_to=None):
        import jax
        offsets = [int(jax.random.randint(k, (), 0, 50)) for k in keys]
        return np.stack([np.clip(i.astype(np.int32) + o, 0, 255).astype(np.uint8) for i, o in zip(images, offsets)])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    src = root / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(src / f"img{i:02d}.png")
    ref = root / "ref"
    settings = RunSettings(upscale=1, process_size=32, color_fix="none", negative_prompt="")
    summary = run(Echo(), None, src, ref, settings, lambda img, rel: "", progress=False)
    assert len(summary.written) == N
    return src, ref


def _start(src, out, delay, load_delay=0.0):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, FAKE_DELAY=str(delay),
               FAKE_LOAD_DELAY=str(load_delay))
    argv = ["--ckpt", "stand-in", "--input", str(src), "--output", str(out), "--process-size", "32", "--upscale",
            "1", "--color-fix", "none", "--prompt", "", "--added-prompt", "", "--negative-prompt", "",
            "--batch-size", "1", "--no-progress", "--no-compile-cache", "--io-threads", "2"]
    return subprocess.Popen([sys.executable, "-c", WORKER, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def _wait_for(predicate, proc, timeout=60.0):
    t = time.monotonic()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t < timeout, "timed out"
        time.sleep(0.02)


def _pngs(out):
    return sorted(p.name for p in out.glob("*.png"))


def _check_complete(out, ref):
    """Every output there, each a whole PNG equal to the uninterrupted run's; nothing else visible."""
    assert _pngs(out) == _pngs(ref)
    for name in _pngs(ref):
        with Image.open(out / name) as img:
            img.load()  # a truncated file raises here
            np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(ref / name)))
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == sorted(_pngs(ref) + ["summary.json"])


def test_sigterm_then_sigkill_mid_folder_then_resume(folder, tmp_path):
    src, ref = folder
    out = tmp_path / "out"
    proc = _start(src, out, delay=0.3)  # 3 s of sampling left when the signal is sent: it lands mid-folder
    _wait_for(lambda: len(_pngs(out)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    print(err[-1500:])
    assert proc.returncode == 143, err[-3000:]
    first = json.loads((out / "summary.json").read_text())
    k = first["written"]
    assert first["status"] == "interrupted by SIGTERM" and 2 <= k < N and first["not_reached"] == N - k
    assert sorted(first["files"]["written"]) == _pngs(out)  # what it says it wrote is exactly what is there
    assert "stopped by SIGTERM" in err

    # a hard kill while images are being written: no visible file is a partial PNG
    proc = _start(src, out, delay=0.2)
    _wait_for(lambda: len(_pngs(out)) >= min(k + 2, N) or proc.poll() is not None, proc)
    proc.kill()
    proc.communicate(timeout=60)
    done = _pngs(out)
    for name in done:
        with Image.open(out / name) as img:
            img.load()
    assert min(k + 2, N) <= len(done) <= N

    proc = _start(src, out, delay=0.0)
    _, err = proc.communicate(timeout=120)
    print(err[-1500:])
    assert proc.returncode == 0, err[-3000:]
    last = json.loads((out / "summary.json").read_text())
    assert last["skipped_existing"] == len(done) and last["written"] == N - len(done) and last["failed"] == 0
    assert f"{N - len(done)} written, {len(done)} skipped (output exists" in err
    assert sorted(last["files"]["written"] + last["files"]["skipped_existing"]) == _pngs(ref)
    assert not set(first["files"]["written"]) & set(last["files"]["written"])  # nothing written twice
    assert last["seconds_per_image"] > 0 and last["status"] == "finished"
    _check_complete(out, ref)


def test_sigterm_while_loading_weights(folder, tmp_path):
    src, _ = folder
    out = tmp_path / "out"
    proc = _start(src, out, delay=0.0, load_delay=30.0)
    _wait_for(lambda: proc.stdout.readline().startswith("LOADING"), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)  # at once, not after the 30 s load
    assert proc.returncode == 143, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted by SIGTERM" and summary["written"] == 0
    assert summary["not_reached"] == N and _pngs(out) == []
