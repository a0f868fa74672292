"""Hugging Face names for --base / --ckpt / convert import, offline against a cache laid out as huggingface_hub
writes it (models--org--name/refs/main + snapshots/<commit>/...), built from the tiny golden checkpoints."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from pasd_jax.convert import hub
from pasd_jax.errors import WeightFileError

SD, PASD = "stable-diffusion-v1-5/stable-diffusion-v1-5", "yangtao9009/PASD"
SUB = "pasd/checkpoint-100000"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _repo(hub_cache, repo: str):
    root = hub_cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    return snap


@pytest.fixture
def hf_cache(golden_dir, tmp_path, monkeypatch):
    """HF_HOME with the tiny SD base and PASD checkpoint cached; downloads off."""
    cache = tmp_path / "hf" / "hub"
    snap = _repo(cache, SD)
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(golden_dir / "tiny_pipeline" / part, snap / part)
    snap = _repo(cache, PASD)
    for part in ("unet", "controlnet"):
        shutil.copytree(golden_dir / "tiny_pasd" / part, snap / SUB / part)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_names_resolve_to_the_cached_snapshot(hf_cache):
    base = hub.resolve_base(SD)
    assert base == hf_cache / f"models--{SD.replace('/', '--')}" / "snapshots" / COMMIT
    ckpt = hub.resolve_pasd(PASD, subfolder=SUB)
    assert ckpt == hf_cache / "models--yangtao9009--PASD" / "snapshots" / COMMIT / SUB
    assert hub.resolve_pasd(f"{PASD}:{SUB}") == ckpt  # the repo:subfolder spelling


def test_sampling_loads_from_names(hf_cache):
    """load_for_sampling on the resolved names: the weights, tokenizer and scheduler all come from the cache."""
    from pasd_jax.sampling import load_for_sampling

    base = hub.resolve_base(SD)
    loaded = load_for_sampling(hub.resolve_pasd(f"{PASD}:{SUB}"), base=base, cache=False)
    assert loaded.variant == "pasd" and set(loaded.params) == {"unet", "controlnet", "vae", "text_encoder"}
    assert loaded.tokenizer_dir == base / "tokenizer"
    assert loaded.scheduler_config == base / "scheduler" / "scheduler_config.json"


def test_name_not_in_the_cache_while_offline(hf_cache):
    with pytest.raises(WeightFileError) as e:
        hub.resolve_base("someone/not-cached")
    msg = str(e.value)
    print(f"\n{msg}")
    assert "not in the cache" in msg and str(hf_cache) in msg and "HF_HUB_OFFLINE=1" in msg


def test_incomplete_cache_names_what_is_missing(hf_cache):
    shutil.rmtree(hf_cache / f"models--{SD.replace('/', '--')}" / "snapshots" / COMMIT / "text_encoder")
    with pytest.raises(WeightFileError, match="has no text_encoder/config.json"):
        hub.resolve_base(SD)
    with pytest.raises(WeightFileError, match="pasd/checkpoint-100000"):  # the repo root has no unet/
        hub.resolve_pasd(PASD)


def test_local_paths_win_over_names(hf_cache, tmp_path, monkeypatch):
    local = tmp_path / "work"
    (local / "stable-diffusion-v1-5" / "stable-diffusion-v1-5").mkdir(parents=True)
    monkeypatch.chdir(local)
    assert not hub.is_hub_name(SD) and hub.resolve_base(SD) == hub.pathlib.Path(SD)
    assert hub.parse_name("/abs/path") is None and hub.parse_name("./a/b") is None
    assert hub.parse_name("org/name@v1.0:sub/dir") == ("org/name", "v1.0", "sub/dir")


def test_convert_import_from_a_name(hf_cache, tmp_path):
    from pasd_jax.convert_cli import main
    from pasd_jax.convert.release import is_flax_checkpoint

    assert main(["import", "--pasd", f"{PASD}:{SUB}", "--out", str(tmp_path / "flax")]) == 0
    assert is_flax_checkpoint(tmp_path / "flax")


def test_sample_cli_reports_an_uncached_name(hf_cache, tmp_path, capsys):
    from pasd_jax.sampling import cli

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / "a.png")
    code = cli.main(["--ckpt", PASD, "--ckpt-subfolder", SUB, "--base", "someone/not-cached", "--input", str(src),
                     "--output", str(tmp_path / "out"), "--no-cache", "--no-compile-cache", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--base someone/not-cached" in err and "not in the cache" in err, err


def test_checkpoint_download_includes_the_scheduler_beside_it(hf_cache, monkeypatch):
    """A colour release keeps scheduler/ beside checkpoint-N: a --ckpt name fetches it with the weights."""
    import huggingface_hub

    asked = []
    real = huggingface_hub.snapshot_download

    def recording(repo, **kw):
        asked.append(kw.get("allow_patterns"))
        return real(repo, **kw)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    hub.resolve_pasd(f"{PASD}:{SUB}")
    assert "pasd/scheduler/scheduler_config.json" in asked[0]
    assert f"{SUB}/unet/config.json" in asked[0]


def test_training_base_by_name(hf_cache, golden_dir, monkeypatch):
    """train.py's model.base takes a name too: resolved to the cached folder before the config checks."""
    from configs import tiny
    from pasd_jax.train.loop import resolve_hub_names

    snap = _repo(hf_cache, "someone/tiny-sd")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        src = golden_dir / ("tiny_pasd" if part == "unet" else "tiny_pipeline") / part
        shutil.copytree(src, snap / part)
    config = tiny.get_config()
    config.model.base = "someone/tiny-sd"
    resolve_hub_names(config)
    assert config.model.base == str(snap)
    config.model.base = "nobody/not-cached"
    with pytest.raises(WeightFileError, match="model.base nobody/not-cached"):
        resolve_hub_names(config)
