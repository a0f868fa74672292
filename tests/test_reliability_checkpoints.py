"""Issue 13.2: a checkpoint step that cannot be read back (a truncated params file, a truncated `meta/metadata`).

Training stops with one line naming the step and the file and how to go on; `resume="latest_intact"` resumes from
the older step and keeps the broken one on disk, out of reach of Orbax's max_to_keep cleanup and of later saves;
`convert export` and `sample.py --ckpt` name the step too. The runs use the real loop, loader, Orbax checkpoints
and restore, with the compiled step replaced by a cheap stand-in (tests/reliability_trainer.py).
"""
from __future__ import annotations

import os
import shutil

import pytest

import reliability_trainer
from configs import tiny
from pasd_jax.convert_cli import main as convert_main
from pasd_jax.errors import PasdError, WeightFileError
from pasd_jax.runs import checkpoint as ckpt_lib
from pasd_jax.train import layout as layout_lib
from pasd_jax.train import loop
from pasd_jax.train.metrics import read_metrics


def config(**overrides):
    c = tiny.get_config()
    c.steps, c.checkpoint_every, c.log_every, c.progress, c.export_at_end = 4, 2, 1, False, False
    c.loader.num_workers, c.max_to_keep = 0, 3
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
    return c


@pytest.fixture(autouse=True)
def cheap_step(monkeypatch):
    monkeypatch.setattr(layout_lib, "compile_step", reliability_trainer.fake_compile_step)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with intact checkpoints at steps 2 and 4."""
    work = tmp_path_factory.mktemp("ck") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layout_lib, "compile_step", reliability_trainer.fake_compile_step)
        assert loop.train(config(), work).step == 4
    return work


def _tree_bytes(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def broken_copy(run, tmp_path, what: str):
    """A copy of the run whose step 4 has its largest params file, or its meta/metadata, cut in half."""
    work = tmp_path / f"broken_{what}"
    shutil.copytree(run, work)
    step = work / "checkpoints" / "4"
    if what == "params":
        victim = max((p for p in (step / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    else:
        victim = step / "meta" / "metadata"
    os.truncate(victim, victim.stat().st_size // 2)
    return work


WHERE = {"params": "params/ (array ", "meta": "meta/metadata"}


@pytest.mark.parametrize("what", ["params", "meta"])
def test_training_stops_naming_the_broken_step(run, tmp_path, what):
    work = broken_copy(run, tmp_path, what)
    before = _tree_bytes(work)
    with pytest.raises(PasdError) as err:  # today: a bare Exception / JSONDecodeError with a TensorStore spec
        loop.train(config(steps=6), work)
    message = str(err.value)
    print(message)
    assert "\n" not in message
    assert f"checkpoint step 4 in {work / 'checkpoints'} cannot be read: {WHERE[what]}" in message
    assert "older steps: 2" in message and "--resume=latest_intact" in message
    assert _tree_bytes(work) == before  # nothing deleted, moved or written


def test_latest_intact_resumes_from_the_older_step_and_keeps_the_broken_one(run, tmp_path, capsys):
    work = broken_copy(run, tmp_path, "params")
    broken_files = {k: v for k, v in _tree_bytes(work / "checkpoints").items() if k.startswith("4/")}
    # max_to_keep=1: Orbax's cleanup deletes every step but the newest after each save
    result = loop.train(config(steps=6, max_to_keep=1), work, resume="latest_intact")
    out = capsys.readouterr().out
    print(out)
    assert (result.status, result.step) == ("finished", 6)
    assert "resumed from step 2" in out
    assert f"checkpoint step 4 cannot be read (params/ (array " in out
    assert f"moved it to {work / 'broken_checkpoints' / '4'} (kept, not deleted)" in out
    kept = _tree_bytes(work / "broken_checkpoints")
    assert kept == broken_files, "the broken step must stay on disk byte for byte after the resume and the saves"
    ck = ckpt_lib.Checkpoints(work / "checkpoints", read_only=True)
    try:
        assert ck.all_steps() == [6] and ck.metadata()["step"] == 6
    finally:
        ck.close()
    assert sorted(read_metrics(work)) == [1, 2, 3, 4, 5, 6]


def test_export_and_sampling_name_the_broken_step(run, tmp_path, capsys):
    from pasd_jax.sampling.loading import load_for_sampling

    work = broken_copy(run, tmp_path, "params")
    before = _tree_bytes(work)
    assert convert_main(["export", "--ckpt", str(work), "--out", str(tmp_path / "release")]) == 2
    err = capsys.readouterr().err.strip()
    print(err)
    assert "\n" not in err and err.startswith(f"error: checkpoint step 4 in {work / 'checkpoints'} cannot be read: "
                                              "params/ (array ")
    assert "other steps on disk: 2" in err and f"--ckpt {work} --step 2" in err
    meta_broken = broken_copy(run, tmp_path, "meta")
    with pytest.raises(WeightFileError) as e:  # today: json.JSONDecodeError, "Unterminated string ..."
        load_for_sampling(meta_broken)
    print(e.value)
    assert "checkpoint step 4" in str(e.value) and "meta/metadata is truncated or damaged" in str(e.value)
    assert _tree_bytes(work) == before
    assert convert_main(["export", "--ckpt", str(work), "--step", "2", "--out", str(tmp_path / "release")]) == 0
    assert "training step: 2" in (tmp_path / "release" / "README.md").read_text()
