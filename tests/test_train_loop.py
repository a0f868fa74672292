"""The training loop on one CPU device with the tiny models and the procedural data pipeline: exact resume after
SIGTERM, the NaN guard, the frozen/trainable split, checkpoint safety, and restore_for_export."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from pasd_jax.convert import from_pytorch, load_pasd_checkpoint
from pasd_jax.convert.io import load_safetensors, save_safetensors
from pasd_jax.runs import checkpoint as ckpt_lib
from pasd_jax.train import data as data_lib
from pasd_jax.train import loop, setup
from pasd_jax.sharding import trainable_split
from pasd_jax.runs.export import export_pytorch, restore_for_export
from pasd_jax.train.metrics import read_metrics
from pasd_jax.runs.models import abstract, build_models
from pasd_jax.errors import ConfigError

STEPS = 4


def config(**overrides):
    c = tiny.get_config()
    c.steps, c.checkpoint_every, c.log_every, c.progress = STEPS, 2, 1, False
    c.loader.num_workers = 0
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
    return c


class Recorder:
    """Wraps the real loader: records a hash of every batch; optionally SIGTERMs this process on batch `kill_at`."""

    def __init__(self, it, log: list[str], kill_at: int | None = None):
        self.it, self.log, self.kill_at = it, log, kill_at

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.log.append(hashlib.sha1(b"".join(np.asarray(batch[k]).tobytes()
                                              for k in data_lib.MODEL_KEYS)).hexdigest())
        if len(self.log) == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def close(self):
        self.it.close()


def recording(log, kill_at=None):
    return lambda *a, **kw: Recorder(data_lib.make_iterator(*a, **kw), log, kill_at)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    starts = []
    real_fresh_start = setup.fresh_start

    def spy(*a, **kw):
        out = real_fresh_start(*a, **kw)
        starts.append(out)
        return out

    hashes = {"a": [], "b": []}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setup, "fresh_start", spy)
        a = loop.train(config(), root / "a", make_iterator=recording(hashes["a"]))
        b1 = loop.train(config(), root / "b", make_iterator=recording(hashes["b"], kill_at=STEPS // 2))
    b2 = loop.train(config(), root / "b", make_iterator=recording(hashes["b"]))
    return {"root": root, "a": a, "b1": b1, "b2": b2, "hashes": hashes, "initial": starts[0]}


def test_resume_after_sigterm_is_exact(runs):
    a, b1, b2 = runs["a"], runs["b1"], runs["b2"]
    assert (a.status, a.step) == ("finished", STEPS)
    assert (b1.status, b1.step) == ("preempted", STEPS // 2)
    assert (b2.status, b2.step) == ("finished", STEPS)
    root = runs["root"]
    assert runs["hashes"]["a"] == runs["hashes"]["b"], "data order differs after resume"
    la, lb = read_metrics(root / "a"), read_metrics(root / "b")
    print("losses straight:", [la[s]["loss"] for s in range(1, STEPS + 1)],
          "interrupted + resumed:", [lb[s]["loss"] for s in range(1, STEPS + 1)])
    assert [la[s]["loss"] for s in range(1, STEPS + 1)] == [lb[s]["loss"] for s in range(1, STEPS + 1)]
    # Step 2 was an async save in run a (the next step donated the state while it was written) and a blocking
    # save on SIGTERM in run b; step 4 is the end of both.
    for step in (STEPS // 2, STEPS):
        pa = restore_for_export(root / "a", step=step)
        pb = restore_for_export(root / "b", step=step)
        for kind in ("unet", "controlnet"):
            fa, fb = trainable_split.flatten(pa[kind][1]), trainable_split.flatten(pb[kind][1])
            assert fa.keys() == fb.keys()
            unequal = [k for k in fa if not np.array_equal(fa[k], fb[k])]
            assert not unequal, (step, unequal[:5])


def test_frozen_base_unchanged_trainable_changed(runs):
    root = runs["root"]
    trainable0, frozen0, _ = runs["initial"]
    exported = load_pasd_checkpoint(root / "a" / "export" / f"checkpoint-{STEPS}")
    paca, sd = trainable_split.split_unet(exported["unet"][1])
    base = trainable_split.flatten(from_pytorch(root / "a" / "base" / "unet")[1])
    sd = trainable_split.flatten(sd)
    assert sd.keys() == base.keys() == trainable_split.flatten(frozen0["unet"]).keys()
    assert all(np.array_equal(np.asarray(sd[k]), np.asarray(base[k])) for k in sd), "frozen SD weights moved"
    for kind, now in (("unet", paca), ("controlnet", exported["controlnet"][1])):
        before, after = trainable_split.flatten(trainable0[kind]), trainable_split.flatten(now)
        same = [k for k in before if np.array_equal(np.asarray(before[k]), np.asarray(after[k]))]
        print(f"{kind}: {len(before) - len(same)} of {len(before)} trainable tensors changed")
        assert not same, same[:5]


def test_restore_for_export(runs, tmp_path):
    root = runs["root"]
    got = restore_for_export(root / "a" / "checkpoints", step=STEPS // 2)
    meta = got["metadata"]
    assert meta["step"] == STEPS // 2 and meta["variant"] == "pasd"
    assert meta["base"]["unet"] == str(root / "a" / "base" / "unet")
    unet_m, unet_p = got["unet"]
    assert unet_m.variant == "pasd" and unet_m.dtype == jnp.float32
    assert trainable_split.flatten(unet_p).keys() == trainable_split.flatten(abstract(unet_m)).keys()
    export_pytorch(got["unet"], got["controlnet"], tmp_path / "release")
    back = load_pasd_checkpoint(tmp_path / "release")
    for kind in ("unet", "controlnet"):
        want, have = trainable_split.flatten(got[kind][1]), trainable_split.flatten(back[kind][1])
        assert want.keys() == have.keys()
        assert all(np.array_equal(np.asarray(want[k]), np.asarray(have[k])) for k in want)


def test_metrics_and_events(runs):
    root = runs["root"] / "a"
    rows = read_metrics(root)
    assert sorted(rows) == list(range(1, STEPS + 1))
    want = {"loss", "mse", "dr_l1_0", "dr_l1_1", "dr_l1_2", "lr", "grad_norm", "samples_per_s",
            "skipped/corrupt", "converted/gray"}
    assert want <= set(rows[1]), set(rows[1])
    assert rows[1]["lr"] == pytest.approx(1e-4)
    assert list((root / "tb").glob("events.out.tfevents.*"))
    assert ckpt_lib.Checkpoints(root / "checkpoints", read_only=True).all_steps() == [2, 4]


def test_nan_guard_keeps_last_good_checkpoint(runs, tmp_path):
    """A NaN in the frozen VAE makes step 5's loss NaN: the run stops with a message naming the last good
    checkpoint, and nothing from the bad state is written."""
    run = tmp_path / "nan"
    shutil.copytree(runs["root"] / "a", run)
    weights = run / "base" / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_safetensors(weights)
    key = next(k for k in tensors if k.startswith("encoder.conv_in.weight"))
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_safetensors(tensors, weights)
    with pytest.raises(loop.NonFiniteLossError) as err:
        loop.train(config(steps=STEPS + 2), run)
    print(err.value)
    assert f"at step {STEPS + 1}" in str(err.value)
    assert f"the last good checkpoint is step {STEPS}" in str(err.value)
    assert ckpt_lib.Checkpoints(run / "checkpoints", read_only=True).latest_step() == STEPS
    assert max(read_metrics(run)) == STEPS
    params = restore_for_export(run)
    assert all(np.isfinite(v).all() for v in trainable_split.flatten(params["controlnet"][1]).values())


def test_partial_and_failed_saves_keep_the_last_good_checkpoint(runs, tmp_path):
    run = tmp_path / "partial"
    shutil.copytree(runs["root"] / "a", run)
    ckdir = run / "checkpoints"
    (ckdir / f"{STEPS + 2}.orbax-checkpoint-tmp-1234" / "params").mkdir(parents=True)  # an interrupted save
    ck = ckpt_lib.Checkpoints(ckdir)
    assert ck.latest_step() == STEPS
    state = {"step": jnp.int32(STEPS + 4), "params": {"w": jnp.ones(3)}, "opt_state": {}, "rng": jnp.zeros(2)}
    with pytest.raises(TypeError, match="JSON serializable"):
        ck.save(state, data_state={"bad": object()}, meta={}, wait=True)
    ck.close()
    ck = ckpt_lib.Checkpoints(ckdir, read_only=True)
    print("steps after a failed save:", ck.all_steps(), sorted(p.name for p in ckdir.iterdir()))
    assert ck.latest_step() == STEPS and ck.all_steps() == [2, 4]
    assert restore_for_export(run)["metadata"]["step"] == STEPS


def test_resume_refuses_another_loader_worker_count(runs, tmp_path):
    run = tmp_path / "workers"
    shutil.copytree(runs["root"] / "a", run)
    with pytest.raises(ConfigError, match="resume with --config.loader.num_workers=0"):
        loop.train(config(steps=STEPS + 2, loader__num_workers=2), run)


# ---------------------------------------------------------------------------------------------------------------
# The three ways to start (no step is compiled: these check the starting params)


def _fresh(c, workdir):
    configs = setup.model_config_dicts(c.model)
    models = build_models(configs, c.model.variant)
    return setup.fresh_start(c, models, configs, workdir)


def _equal(a, b) -> bool:
    fa, fb = trainable_split.flatten(a), trainable_split.flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def test_start_from_sd_base_copies_the_unet_into_the_controlnet(runs, tmp_path):
    base = runs["root"] / "a" / "base"  # a diffusers-layout SD folder (unet/, vae/, text_encoder/)
    trainable, frozen, paths = _fresh(config(model__base=str(base)), tmp_path)
    sd_unet = from_pytorch(base / "unet")[1]
    assert paths["unet"] == str(base / "unet") and not (tmp_path / "base").exists()
    assert _equal(frozen["unet"], sd_unet) and _equal(frozen["vae"], from_pytorch(base / "vae")[1])
    cn = trainable["controlnet"]
    for name in ("conv_in", "time_embedding", "down_blocks_0", "mid_block"):   # official `from_unet`
        assert _equal(cn[name], sd_unet[name]), name
    for name in ("controlnet_mid_block", "controlnet_down_blocks_0"):          # zero convs
        assert all(not np.any(v) for v in trainable_split.flatten(cn[name]).values()), name
    # PACA keeps PyTorch's default init (spec 2.5): random kernels and linear biases, norms at gamma 1 / beta 0
    for key, v in trainable_split.flatten(trainable["unet"]).items():
        name = "/".join(map(str, key)) if isinstance(key, tuple) else str(key)
        if re.search(r"norm[^/]*/scale$", name):
            assert np.all(np.asarray(v) == 1), name
        elif re.search(r"norm[^/]*/bias$", name):
            assert not np.any(v), name
        else:
            assert np.all(np.asarray(v) != 0) and float(np.std(v)) > 0, name


def test_start_from_official_checkpoint(golden_dir, tmp_path):
    c = config(model__init_from=str(golden_dir / "tiny_pasd"), model__base=str(golden_dir / "tiny_pipeline"))
    from pasd_jax.train.config_checks import validate
    validate(c, n_devices=1)
    trainable, frozen, paths = _fresh(c, tmp_path)
    official = load_pasd_checkpoint(golden_dir / "tiny_pasd")
    paca, sd = trainable_split.split_unet(official["unet"][1])
    assert _equal(trainable["controlnet"], official["controlnet"][1]) and _equal(trainable["unet"], paca)
    assert _equal(frozen["unet"], sd)
    assert _equal(frozen["text_encoder"], from_pytorch(golden_dir / "tiny_pipeline" / "text_encoder")[1])
    assert paths["unet"] == str(golden_dir / "tiny_pasd" / "unet")


def test_start_from_own_run(runs, tmp_path):
    trainable, frozen, paths = _fresh(config(model__init_from=str(runs["root"] / "a")), tmp_path)
    done = restore_for_export(runs["root"] / "a")
    paca, sd = trainable_split.split_unet(done["unet"][1])
    assert _equal(trainable["controlnet"], done["controlnet"][1]) and _equal(trainable["unet"], paca)
    assert _equal(frozen["unet"], sd)
    assert paths == done["metadata"]["base"]


def test_validation_samples_every_n_steps(tmp_path):
    from PIL import Image

    from pasd_jax.train.validation import VALIDATION_DIR
    lq = tmp_path / "lq"
    lq.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(lq / "a.png")
    c = config(validation__every=2, validation__images=str(lq), validation__steps=2, validation__upscale=4,
               validation__scheduler="ddim", checkpoint_every=4, export_at_end=False)
    result = loop.train(c, tmp_path / "run")
    assert result.status == "finished"
    outs = {s: tmp_path / "run" / VALIDATION_DIR / f"step_{s}" / "a.png" for s in (2, 4)}
    imgs = {s: np.asarray(Image.open(p)) for s, p in outs.items()}
    assert all(im.shape == (64, 64, 3) for im in imgs.values())
    assert not np.array_equal(imgs[2], imgs[4]), "validation samples should follow the trained weights"


def test_failed_validation_does_not_stop_training(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from pasd_jax.train.validation import Validator
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")

    def boom(self, *args):
        raise RuntimeError("out of memory (test)")

    monkeypatch.setattr(Validator, "__call__", boom)
    result = loop.train(config(validation__every=2, validation__images=str(tmp_path / "a.png"), export_at_end=False),
                        tmp_path / "run")
    assert (result.status, result.step) == ("finished", STEPS)
    assert ("validation samples of step 2 failed (RuntimeError: out of memory (test)); training continues"
            in capsys.readouterr().out)


def test_validation_needs_images(tmp_path):
    from pasd_jax.train.config_checks import validate
    with pytest.raises(ConfigError, match="validation.images='' does not exist"):
        validate(config(validation__every=2), n_devices=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        validate(config(validation__every=2, validation__images=str(tmp_path / "empty")), n_devices=1)
    from PIL import Image
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="validation: SamplingOptions"):
        validate(config(validation__every=2, validation__images=str(tmp_path), validation__scheduler="euler"),
                 n_devices=1)
