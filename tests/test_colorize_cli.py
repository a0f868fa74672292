"""`pasd-sample --task colorize` on the release layout (`<run>/checkpoint-N` + `<run>/scheduler`): where the
scheduler comes from, and the one-line refusals (no scheduler folder, a config key we do not implement), all
before anything is compiled."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pasd_jax.sampling import cli
from pasd_jax.sampling.loading import load_for_sampling, scheduler_beside_checkpoint


@pytest.fixture()
def release(golden_dir, tmp_path):
    """runs/pasd_light_color/{checkpoint-0 -> tiny pasd_light, scheduler = the golden's zero-SNR config}."""
    run = tmp_path / "runs" / "pasd_light_color"
    run.mkdir(parents=True)
    (run / "checkpoint-0").symlink_to(golden_dir / "tiny_pasd_light", target_is_directory=True)
    shutil.copytree(golden_dir / "tiny_pipeline_gray" / "scheduler", run / "scheduler")
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(tmp_path / "in" / "a.png")
    return run


def _main(tmp_path, golden_dir, ckpt, *extra):
    return cli.main(["--ckpt", str(ckpt), "--base", str(golden_dir / "tiny_pipeline"), "--input",
                     str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--process-size", "64", "--steps",
                     "2", "--no-cache", "--no-progress", *extra])


def test_scheduler_beside_the_checkpoint(release, golden_dir):
    assert scheduler_beside_checkpoint(release / "checkpoint-0") == release / "scheduler"
    loaded = load_for_sampling(release / "checkpoint-0", base=golden_dir / "tiny_pipeline", cache=False,
                               scheduler_beside=True)
    assert loaded.scheduler_config == release / "scheduler" and loaded.variant == "pasd_light"
    sr = load_for_sampling(release / "checkpoint-0", base=golden_dir / "tiny_pipeline", cache=False)
    assert sr.scheduler_config == golden_dir / "tiny_pipeline" / "scheduler" / "scheduler_config.json"  # official sr


@pytest.mark.parametrize("flag", ["--task=colorize", "--control-type=grayscale"])
def test_missing_scheduler_folder_is_one_line(release, golden_dir, tmp_path, capsys, flag):
    shutil.rmtree(release / "scheduler")
    code = _main(tmp_path, golden_dir, release / "checkpoint-0", flag)
    err = capsys.readouterr().err.strip().splitlines()
    print(err)
    assert code == 2 and err[-1].startswith("error: colorization reads its scheduler from the scheduler/ folder")
    assert str(release / "scheduler" / "scheduler_config.json") in err[-1] and "--scheduler-config" in err[-1]


@pytest.mark.parametrize("key,value", [("timestep_spacing", "quadratic"), ("solver_p", {"name": "DDIM"}),
                                       ("beta_schedule", "sigmoid"), ("final_sigmas_type", "sigma_max")])
def test_scheduler_config_key_we_do_not_implement_is_refused(release, golden_dir, tmp_path, capsys, key, value):
    path = release / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    code = _main(tmp_path, golden_dir, release / "checkpoint-0", "--task", "colorize")
    err = capsys.readouterr().err.strip().splitlines()
    print(err[-1])
    assert code == 2 and err[-1].startswith("error: unipc scheduler config: ") and f"{key}=" in err[-1]
    assert "supported" in err[-1]
    assert not (tmp_path / "out" / "a.png").exists()


def test_scheduler_config_override(release, golden_dir, tmp_path, capsys):
    code = _main(tmp_path, golden_dir, release / "checkpoint-0", "--task", "colorize", "--scheduler-config",
                 str(tmp_path / "nowhere"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--scheduler-config" in err[-1] and "no scheduler_config.json" in err[-1]
