"""Issue 13, items 6, 7, 9, 10: what the commands say and how they end.

- 6: a folder of another model kind given as a PASD checkpoint names what it found and what was expected;
- 7: a misspelled `--config` override is one line with the suggestion (exit 2), not an ml_collections traceback;
- 10: a preempted run exits 143 (SIGTERM), documented in --help; a NaN stop leaves no leaked shared memory;
- 9: a trainer killed with SIGKILL leaves no Grain worker behind (slow: whole trainer processes).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pasd_jax.convert_cli import main as convert_main
from tests.processes import alive as _alive
from tests.processes import children as _children
from tests.processes import wait_gone
from pasd_jax.convert.io import WeightFileError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.py"


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra)


# ------------------------------------------------------------------------------------------ 6: wrong model kind

@pytest.fixture()
def vae_as_unet(golden_dir, tmp_path):
    """A checkpoint-shaped folder whose unet/ is really a VAE (config.json: AutoencoderKL)."""
    ck = tmp_path / "ck"
    shutil.copytree(golden_dir / "tiny_pipeline" / "vae", ck / "unet")
    shutil.copytree(golden_dir / "tiny_pasd" / "controlnet", ck / "controlnet")
    return ck


def test_import_of_a_vae_folder_says_what_it_found(vae_as_unet, golden_dir, tmp_path, capsys):
    cases = ((vae_as_unet,
              f"{vae_as_unet / 'unet'} holds a VAE (config.json: AutoencoderKL), but expected a PASD UNet"),
             (golden_dir / "tiny_pipeline" / "vae", "(it is a VAE model folder (config.json: AutoencoderKL)): expected "
              "unet/ and controlnet/"),
             (golden_dir / "tiny_pipeline", "(it is a Stable Diffusion pipeline folder (text_encoder/, vae/): that is "
              "an SD base (--base), not a PASD checkpoint)"))
    for src, message in cases:
        rc = convert_main(["import", "--pasd", str(src), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        print(err)
        assert rc == 2 and "\n" not in err and message in err, err  # today: AttributeError ... no attribute 'variant'
    assert not (tmp_path / "out").exists()


def test_sampling_from_a_vae_folder_says_what_it_found(vae_as_unet, golden_dir):
    from pasd_jax.sampling.loading import load_for_sampling

    with pytest.raises(WeightFileError) as e:
        load_for_sampling(vae_as_unet, base=golden_dir / "tiny_pipeline")
    print(e.value)
    assert f"{vae_as_unet / 'unet'} holds a VAE (config.json: AutoencoderKL)" in str(e.value)
    assert "expected a PASD UNet" in str(e.value)
    with pytest.raises(WeightFileError) as e:
        load_for_sampling(golden_dir / "tiny_pipeline" / "vae", base=golden_dir / "tiny_pipeline")
    print(e.value)
    assert "it is a VAE model folder (config.json: AutoencoderKL)" in str(e.value)


# ------------------------------------------------------------------------------------------ 7 and 10: train.py

def test_misspelled_override_is_one_line_with_the_suggestion(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(TINY), "--workdir",
                           str(tmp_path / "run"), "--config.optim.lrr=1e-3"],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=_env(), check=False)
    print(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: --config.optim.lrr=1e-3: the config has no field 'lrr'; did you mean "
                                   "'lr' (--config.optim.lr=1e-3)? (see --help)")
    assert not (tmp_path / "run").exists()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "configs/no_such.py", "--workdir",
                           str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO, timeout=300, env=_env(),
                          check=False)
    print(proc.stderr)  # today: two chained OSError tracebacks (37 lines)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --config configs/no_such.py: no such config file; the shipped ones are configs/*.py (see --help)")


def test_exit_codes_are_documented_in_help():
    from pasd_jax.train.cli import exit_code

    assert exit_code("preempted", signal.SIGTERM) == 143 and exit_code("preempted", signal.SIGINT) == 130
    assert exit_code("finished", None) == 0
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env=_env(), check=False)
    text = proc.stdout + proc.stderr  # (absl ends --help with exit status 1)
    print(text)
    assert "143  stopped by SIGTERM (preemption) after saving a checkpoint: requeue" in text
    assert "--resume=latest_intact" in text


def test_loader_batches_are_copied_off_shared_memory():
    """Grain hands batches over in shared memory; a batch still referenced at exit (a NaN stop's traceback holds
    the last one) was reported as "leaked shared_memory objects". The step inputs are plain copies."""
    import numpy as np

    from pasd_jax.train import data as data_lib

    class Shared(np.ndarray):  # stands in for grain's SharedMemoryArray (an ndarray subclass)
        pass

    batch = {k: np.zeros((2, 8, 8, 3), np.uint8).view(Shared) for k in ("hq", "lq")}
    batch["input_ids"] = np.zeros((2, 77), np.int32).view(Shared)
    arrays, _ = data_lib.split_counters(batch)
    for k, v in arrays.items():
        assert type(v) is np.ndarray and not np.shares_memory(v, batch[k]), k


# ------------------------------------------------------------------------------------------ 9 and 10: whole runs

def _trainer(work, *flags, **env):
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "reliability_trainer.py"), "--config", str(TINY),
                             "--workdir", str(work), "--config.loader.num_workers=1", "--config.progress=False",
                             "--config.export_at_end=False", "--config.log_every=1", *flags],
                            cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_training(proc, work, timeout=240) -> list[int]:
    """Once a step is logged (the loader's worker is up), the trainer's child processes."""
    t0 = time.time()
    while not (work / "metrics.jsonl").is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the trainer did not start training"
        time.sleep(0.5)
    kids = _children(proc.pid)
    assert kids, "no loader worker process"
    return kids


@pytest.mark.slow
def test_sigkilled_trainer_leaves_no_worker(tmp_path):
    proc = _trainer(tmp_path / "run", "--config.steps=100000", "--config.checkpoint_every=100000")
    kids: list[int] = []
    try:
        kids = _wait_for_training(proc, tmp_path / "run")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        t0 = time.time()
        left = wait_gone(kids)
        print(f"children {kids}; alive {time.time() - t0:.1f}s after SIGKILL: {left}")
        assert not left, "Grain workers outlived their trainer"  # today: still there minutes later, parent 1
    finally:
        if proc.poll() is None:
            kids += _children(proc.pid)
            proc.kill()
        for p in _alive(kids):  # never leave a test's orphans behind
            os.kill(p, signal.SIGKILL)


@pytest.mark.slow
def test_sigterm_exits_143_and_nan_stop_leaks_nothing(tmp_path):
    proc = _trainer(tmp_path / "run", "--config.steps=100000", "--config.checkpoint_every=100000")
    kids = _wait_for_training(proc, tmp_path / "run")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    print(out[-500:], err[-1000:])
    assert proc.returncode == 143  # today: 0, so a scheduler takes the preempted run for a finished one
    assert "stopped by signal 15" in out
    assert not wait_gone(kids)  # Grain workers leave on their own once the trainer is gone: under load, a moment
    proc = _trainer(tmp_path / "nan", "--config.steps=6", "--config.checkpoint_every=2", FAKE_NAN_AT="3")
    out, err = proc.communicate(timeout=300)
    print(out[-500:], err[-1000:])
    assert proc.returncode == 1 and "non-finite training values at step 3" in err
    assert "leaked shared_memory" not in err and "Traceback" not in err
