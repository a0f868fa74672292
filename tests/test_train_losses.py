"""PASD training objective, trainable/frozen split, sharding rules and config validation (CPU, one device)."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from configs import tiny
from pasd_jax.convert import load_pasd_checkpoint
from pasd_jax.convert.io import load_safetensors
from pasd_jax import sharding
from pasd_jax.sharding import trainable_split
from pasd_jax.models.bundle import Models
from pasd_jax.train.step import Diffusion, StepInputs, forward_losses
from pasd_jax.errors import ConfigError
from pasd_jax.train.config_checks import validate


def np_downsample(x: np.ndarray, factor: int) -> np.ndarray:
    """torch bilinear (align_corners=False, no antialias) by an integer factor: sample position d*f + (f-1)/2,
    i.e. the mean of pixels f/2-1 and f/2 of each block on each axis (a 2x2 box for f=2); float64."""
    a, b = factor // 2 - 1, factor // 2
    x = (x[..., a::factor, :] + x[..., b::factor, :]) / 2
    return (x[..., a::factor] + x[..., b::factor]) / 2


# ---------------------------------------------------------------------------------------------------------------
# Loss terms against the official tiny PASD goldens


@pytest.fixture(scope="module")
def golden(golden_dir):
    models = load_pasd_checkpoint(golden_dir / "tiny_pasd")
    io = load_safetensors(golden_dir / "tiny_pasd" / "inputs_outputs.safetensors")
    return models, io


def test_golden_loss_terms(golden):
    (models, io) = golden
    (unet_m, unet_p), (cn_m, cn_p) = models["unet"], models["controlnet"]
    paca, sd = trainable_split.split_unet(unet_p)
    rng = np.random.default_rng(0)
    gt = rng.uniform(-1, 1, io["input.controlnet_cond"].shape).astype(np.float32)
    noise = rng.standard_normal(io["input.sample"].shape).astype(np.float32)
    x = StepInputs(io["input.sample"], io["input.timesteps"], io["input.encoder_hidden_states"],
                   io["input.controlnet_cond"], gt, noise)
    diffusion = Diffusion(alphas_cumprod=(0.5,), null_ids=(0,), dr_weight=1.0, conditioning_scale=1.0)
    mods = Models(unet=unet_m, controlnet=cn_m, vae=None, text_encoder=None)
    fn = jax.jit(functools.partial(forward_losses, models=mods, diffusion=diffusion))
    loss, terms = fn({"controlnet": cn_p, "unet": paca}, sd, x=x)

    want = {"mse": np.mean((io["unet.s1.noise_pred"].astype(np.float64) - noise) ** 2)}
    for k, f in enumerate((2, 4, 8)):
        rgb = io[f"controlnet.rgbs.{k}"].astype(np.float64)
        want[f"dr_l1_{k}"] = np.mean(np.abs(rgb - np_downsample(gt.astype(np.float64), f)))
    want_total = sum(want.values())
    errors = {k: abs(float(terms[k]) - v) for k, v in want.items()}
    errors["total"] = abs(float(loss) - want_total)
    print("loss terms", {k: float(v) for k, v in terms.items()}, "abs errors vs numpy on goldens", errors)
    assert set(terms) == set(want)
    assert max(errors.values()) <= 1e-6, errors


def test_np_downsample_is_torch_bilinear():
    """The numpy reference above against pasd_jax.image_ops (itself checked against torch) on one example."""
    from pasd_jax.image_ops import resize_bilinear_no_antialias
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    for f in (2, 4, 8):
        got = np.asarray(resize_bilinear_no_antialias(x, (64 // f, 64 // f)))
        err = np.max(np.abs(got - np_downsample(x.astype(np.float64), f)))
        print(f"downsample x{f}: max abs err {err:.2e}")
        assert err < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Trainable / frozen split


def test_split_matches_official_trainable_modules(golden):
    models, _ = golden
    unet = models["unet"][1]
    paca, sd = trainable_split.split_unet(unet)
    flat_p, flat_s = trainable_split.flatten(paca), trainable_split.flatten(sd)
    # 6 PACA transformers x 26 tensors (spec 3.3) in the tiny UNet's 480; everything else is SD.
    assert len(flat_p) == 6 * 26 and len(flat_p) + len(flat_s) == 480
    assert all("/pixel_attentions_" in k for k in flat_p) and not any("pixel_attentions" in k for k in flat_s)
    assert trainable_split.flatten(trainable_split.merge(sd, paca)).keys() == trainable_split.flatten(unet).keys()
    with pytest.raises(ValueError, match="overlap"):
        trainable_split.merge(sd, sd)
    with pytest.raises(ValueError, match="no UNet parameter matches"):
        trainable_split.split_unet(sd)


def test_split_pasd_light(golden_dir):
    unet = load_pasd_checkpoint(golden_dir / "tiny_pasd_light")["unet"][1]
    paca, sd = trainable_split.split_unet(unet)
    flat_p, flat_s = trainable_split.flatten(paca), trainable_split.flatten(sd)
    print("pasd_light trainable leaves:", len(flat_p), "frozen:", len(flat_s))
    for name in ("attn2_plus", "norm2_plus", "proj_in_plus"):
        assert any(name in k for k in flat_p), name
    assert not any(n in k for k in flat_s for n in trainable_split.DEFAULT_TRAINABLE)


# ---------------------------------------------------------------------------------------------------------------
# Sharding rules (pure logic on an abstract mesh)

RULES = (("(to_out_0|ff/net_2|proj_out)/kernel$", ("tensor", "fsdp")), ("kernel$", ("fsdp", "tensor")),
         ("embedding$", (None, "fsdp")))


@pytest.mark.parametrize("sizes,path,shape,min_size,want", [
    ((2, 4, 1), "a/attn1/to_q/kernel", (32, 40), 0, P("fsdp")),               # in over fsdp, tensor=1 dropped
    ((1, 2, 2), "a/attn1/to_q/kernel", (32, 40), 0, P("fsdp", "tensor")),
    ((1, 2, 2), "a/attn1/to_out_0/kernel", (32, 40), 0, P("tensor", "fsdp")),
    ((1, 8, 1), "conv_in/kernel", (3, 3, 4, 32), 0, P()),                      # 4 input channels: not divisible
    ((1, 8, 1), "down/conv1/kernel", (3, 3, 32, 32), 0, P(None, None, "fsdp")),  # HWIO: trailing dims
    ((1, 8, 1), "down/conv1/kernel", (3, 3, 32, 32), 10_000, P()),             # under min_size: replicated
    ((1, 8, 1), "down/conv1/bias", (32,), 0, P()),                             # no rule: replicated
    ((1, 8, 1), "token_embedding/embedding", (49408, 24), 0, P(None, "fsdp")),
    ((8, 1, 1), "a/to_q/kernel", (32, 40), 0, P()),                            # pure data parallel
])
def test_spec_for(sizes, path, shape, min_size, want):
    mesh = AbstractMesh(sizes, sharding.AXES)
    assert sharding.spec_for(path, shape, mesh, RULES, min_size) == want


@pytest.mark.parametrize("cfg,n,want", [
    ({"data": -1, "fsdp": 1, "tensor": 1}, 8, {"data": 8, "fsdp": 1, "tensor": 1}),
    ({"data": 2, "fsdp": -1, "tensor": 1}, 8, {"data": 2, "fsdp": 4, "tensor": 1}),
    ({"data": 1, "fsdp": 8, "tensor": 1}, 8, {"data": 1, "fsdp": 8, "tensor": 1}),
])
def test_mesh_shape(cfg, n, want):
    assert sharding.mesh_shape(cfg, n) == want


# ---------------------------------------------------------------------------------------------------------------
# Config validation: every bad value fails before anything is built or compiled, saying what to change


class CompileCounter:
    """Counts jaxpr -> MLIR lowerings (every jit compile, cached or not, starts with one)."""

    def __init__(self):
        self.count = 0
        self.active = False

    def __call__(self, event: str, duration: float, **kw) -> None:
        if self.active and event.startswith("/jax/core/compile/jaxpr_to_mlir"):
            self.count += 1


@pytest.fixture(scope="module")
def compile_counter():
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    yield counter
    jax.monitoring.unregister_event_duration_listener(counter)


def _bad(**overrides):
    c = tiny.get_config()
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
    return c


BAD = [
    ("mesh does not fill the devices", dict(mesh__data=3), "needs 3 devices but there are 1"),
    ("two -1 mesh axes", dict(mesh__data=-1, mesh__fsdp=-1), "at most one may be -1"),
    ("unknown mesh axis", dict(mesh__pipeline=2), "unknown"),
    ("batch not a multiple of grad_accum", dict(batch_size=5, grad_accum=2), "not a multiple of grad_accum"),
    ("missing base folder", dict(model__base="/nonexistent/sd15"), "model.base='/nonexistent/sd15' does not exist"),
    ("missing init_from", dict(model__init_from="/nonexistent/run"), "model.init_from='/nonexistent/run'"),
    ("missing random-init config", dict(model__vae_config="/nonexistent"), "model.vae_config"),
    ("unknown variant", dict(model__variant="pasd_xl"), "model.variant='pasd_xl'"),
    ("unknown dtype", dict(model__compute_dtype="fp8"), "model.compute_dtype='fp8'"),
    ("empty trainable", dict(model__trainable=()), "model.trainable is empty"),
    ("unknown optimizer", dict(optim__name="lion"), "optim.name='lion'"),
    ("non-positive lr", dict(optim__lr=0.0), "optim.lr=0.0"),
    ("null ratio", dict(diffusion__null_text_ratio=1.5), "null_text_ratio"),
    ("missing scheduler", dict(diffusion__scheduler="/nonexistent"), "diffusion.scheduler"),
    ("missing tokenizer", dict(loader__tokenizer="/nonexistent"), "loader.tokenizer"),
    ("unknown loader", dict(loader__source="webdataset"), "loader.source='webdataset'"),
    ("crop size", dict(data__crop_size=60), "data.crop_size=60"),
    ("steps", dict(steps=0), "steps=0"),
]


@pytest.mark.parametrize("what,overrides,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_fails_before_compiling(what, overrides, message, tmp_path, compile_counter):
    from pasd_jax.train.loop import train
    compile_counter.active, compile_counter.count = True, 0
    try:
        with pytest.raises(ConfigError) as err:
            train(_bad(**overrides), tmp_path / "run")
    finally:
        compile_counter.active = False
    print(f"{what}: {err.value}")
    assert message in str(err.value)
    assert compile_counter.count == 0
    assert not (tmp_path / "run").exists()


def test_missing_data_folder_fails_before_compiling(tmp_path, compile_counter):
    from pasd_jax.train.loop import train
    c = _bad(loader__num_workers=0)
    c.data.sources = [{"kind": "folder", "path": str(tmp_path / "no_images"), "weight": 1.0}]
    compile_counter.active, compile_counter.count = True, 0
    try:
        with pytest.raises(FileNotFoundError, match="no_images does not exist"):
            train(c, tmp_path / "run")
    finally:
        compile_counter.active = False
    assert compile_counter.count == 0


def test_base_folder_without_parts(tmp_path):
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "unet" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"has no vae/config.json, text_encoder/config.json"):
        validate(_bad(model__base=str(tmp_path / "sd")), n_devices=1)


def test_batch_must_split_over_the_mesh():
    """On 8 devices a micro-batch of 12 does not split over data=8; the message gives the multiple to use."""
    with pytest.raises(ConfigError, match=r"12 samples per micro-batch.*multiple of grad_accum x data x fsdp = 16"):
        validate(_bad(batch_size=24, grad_accum=2, mesh__data=-1), n_devices=8)
    with pytest.raises(ConfigError, match="do not split over 3 hosts"):
        validate(_bad(batch_size=16, grad_accum=1, mesh__data=-1), n_devices=8, process_count=3)
    assert validate(_bad(batch_size=32, grad_accum=2, mesh__data=2, mesh__fsdp=4), n_devices=8) == {
        "data": 2, "fsdp": 4, "tensor": 1}
