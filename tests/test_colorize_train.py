"""Colorization training (issue 14): the grayscale pairs, the colorfulness term, the prediction type and
zero-SNR schedule from the scheduler config, and a tiny colour run end to end: a few CPU steps, export with
`scheduler/` beside the checkpoint, then `pasd-sample --task colorize` on the export."""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import pasd_light_color, tiny
from data_pipeline.color_pairs import gray_condition
from data_pipeline.loader import make_train_iterator
from pasd_jax.train import losses, loop
from pasd_jax.errors import ConfigError


def _numpy_colorfulness(rgb: np.ndarray) -> np.ndarray:
    """The official colorful_loss's per-image colorfulness, written out in float64."""
    r, g, b = rgb[:, 0].astype(np.float64), rgb[:, 1].astype(np.float64), rgb[:, 2].astype(np.float64)
    rg, yb = np.abs(r - g), np.abs(0.5 * (r + g) - b)
    out = []
    for i in range(rgb.shape[0]):
        std = np.sqrt(rg[i].std(ddof=1) ** 2 + yb[i].std(ddof=1) ** 2)
        mean = np.sqrt(rg[i].mean() ** 2 + yb[i].mean() ** 2)
        out.append(std + 0.3 * mean)
    return np.asarray(out)


def test_colorfulness_term():
    rng = np.random.default_rng(0)
    rgbs = [rng.uniform(-1, 1, (2, 3, s, s)).astype(np.float32) for s in (16, 8, 4)]
    got = np.asarray(losses.colorfulness(jnp.asarray(rgbs[0])))
    np.testing.assert_allclose(got, _numpy_colorfulness(rgbs[0]), rtol=1e-5)  # float32 vs float64 reductions
    # official: 0.001 x (sum over images of 1 - c) per output, summed over outputs, added once per output (3x);
    # summed over the per-GPU batch (4) = 4 x the batch mean.
    per_output_sum = sum(float(np.sum(1 - _numpy_colorfulness(x))) for x in rgbs)
    official = 3 * 0.001 * per_output_sum / 2 * 4
    for repeats, want in ((3, official), (1, official / 3)):
        value = float(losses.colorfulness_loss([jnp.asarray(x) for x in rgbs], 0.001, repeats, 4))
        print(f"repeats {repeats}: {value:.6g} (numpy {want:.6g})")
        np.testing.assert_allclose(value, want, rtol=1e-5)
    # in the total only when its weight is set; a flat (gray) output gets finite gradients, not NaN
    total, terms = losses.pasd_loss(jnp.zeros((2, 4, 4, 4)), jnp.zeros((2, 4, 4, 4)), [jnp.asarray(rgbs[0])],
                                    jnp.zeros((2, 3, 32, 32)), colorfulness_weight=0.001)
    assert "colorfulness" in terms and float(total) > float(terms["mse"] + terms["dr_l1_0"])
    assert "colorfulness" not in losses.pasd_loss(jnp.zeros((1, 4, 2, 2)), jnp.zeros((1, 4, 2, 2)),
                                                  [jnp.asarray(rgbs[0])], jnp.zeros((2, 3, 32, 32)))[1]
    grad = jax.grad(lambda x: losses.colorfulness_loss([x]))(jnp.zeros((1, 3, 4, 4)))
    assert np.isfinite(np.asarray(grad)).all()


def test_gray_pairs_from_the_loader():
    cfg = pasd_light_color.get_config().data
    cfg.sources = ({"kind": "procedural", "n": 8, "size": 64, "seed": 0, "weight": 1.0},)
    cfg.crop_size, cfg.probe_records = 64, 1
    with make_train_iterator(cfg, seed=0, process_index=0, process_count=1, batch_size=2,
                             tokenizer_path=None) as it:
        batch = next(it)
    hq, lq = batch["hq"], batch["lq"]
    assert hq.std(axis=-1).mean() > 1.0                      # the target keeps its colour
    for a, b in zip(hq, lq):
        np.testing.assert_array_equal(b, gray_condition(a))  # the condition is exactly its luma, L -> RGB
    np.testing.assert_array_equal(lq[..., 0], lq[..., 2])


def test_training_schedule_and_prediction_type_from_the_scheduler_config(tmp_path):
    c = pasd_light_color.color_settings(tiny.get_config())
    d = loop.make_diffusion(c)
    assert d.prediction_type == "epsilon" and d.colorfulness_weight == 0.001 and d.colorfulness_repeats == 3
    assert d.alphas_cumprod[-1] == 0.0 and d.alphas_cumprod[0] > 0.99    # zero terminal SNR (DDPM: exactly 0)
    cfg = json.loads((pasd_light_color.ZERO_SNR_SCHEDULER / "scheduler_config.json").read_text())
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    c.diffusion.scheduler, c.diffusion.colorfulness_terms = str(tmp_path), "single"
    d = loop.make_diffusion(c)
    assert d.prediction_type == "v_prediction" and d.colorfulness_repeats == 1
    c.diffusion.colorfulness_terms = "twice"
    with pytest.raises(ConfigError, match="colorfulness_terms"):
        loop.make_diffusion(c)


def test_v_prediction_target():
    from pasd_jax.train.step import Diffusion
    from pasd_jax.train import step as step_lib
    # draw_inputs' target for v: sqrt(abar) * eps - sqrt(1 - abar) * z0 (diffusers get_velocity); at the zero-SNR
    # end (abar = 0) the noisy latent is pure noise and v = -z0.
    calls = {}

    class FakeVAE:
        config = type("C", (), {"scaling_factor": 1.0})
        encode = "encode"

        def apply(self, params, gt, method=None):
            calls["gt"] = gt
            return jnp.ones((gt.shape[0], 4, 2, 2)), jnp.full((gt.shape[0], 4, 2, 2), -60.0)   # std ~ 0

    class FakeText:
        def apply(self, params, ids):
            return jnp.zeros(ids.shape + (8,))

    models = type("M", (), {"vae": FakeVAE(), "text_encoder": FakeText()})()
    diffusion = Diffusion(alphas_cumprod=(0.0,), null_ids=(0,) * 77, prediction_type="v_prediction")
    batch = {"hq": jnp.zeros((1, 16, 16, 3), jnp.uint8), "lq": jnp.zeros((1, 16, 16, 3), jnp.uint8),
             "input_ids": jnp.zeros((1, 77), jnp.int32)}
    x = step_lib.draw_inputs({"vae": {}, "text_encoder": {}}, models, batch, jax.random.split(jax.random.key(0), 1),
                             diffusion)
    np.testing.assert_allclose(np.asarray(x.target), -1.0, atol=1e-6)


@pytest.mark.slow  # compiling the tiny train step dominates: 50-65 s measured on the shared (loaded) 2-core machine
def test_tiny_colour_training_export_and_colorize(tmp_path, shared_dir, capsys, caplog):
    from pasd_jax.sampling import cli

    caplog.set_level(logging.INFO)
    c = pasd_light_color.color_settings(tiny.get_config())
    c.steps, c.checkpoint_every, c.log_every, c.progress = 2, 2, 1, False
    c.batch_size, c.loader.num_workers = 1, 0
    work = tmp_path / "run"
    result = loop.train(c, work)
    assert result.status == "finished" and result.export_dir == work / "export" / "checkpoint-2"
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    colour = [r["colorfulness"] for r in rows if "colorfulness" in r]
    print(f"\nlogged colorfulness terms {colour}, losses {[r['loss'] for r in rows if 'loss' in r]}")
    assert colour and all(np.isfinite(colour))
    written = work / "export" / "scheduler" / "scheduler_config.json"     # release layout: beside checkpoint-2
    assert json.loads(written.read_text()) == json.loads(
        (pasd_light_color.ZERO_SNR_SCHEDULER / "scheduler_config.json").read_text())

    from pasd_jax.runs.export import export_train_checkpoint   # `pasd-convert export` does the same
    release = export_train_checkpoint(work, tmp_path / "release" / "pasd_light_color" / "checkpoint-2")
    assert (release.parent / "scheduler" / "scheduler_config.json").read_text() == written.read_text()

    src = np.asarray(Image.open(shared_dir / "examples" / "RealSRSet" / "frog.png").convert("RGB"))[80:120, 100:148]
    (tmp_path / "in").mkdir()
    Image.fromarray(src).save(tmp_path / "in" / "frog.png")
    code = cli.main(["--task", "colorize", "--ckpt", str(result.export_dir), "--base", str(work / "base"),
                     "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--process-size", "64",
                     "--steps", "2", "--dtype", "float32", "--upscale", "2", "--no-cache", "--no-progress"])
    err = capsys.readouterr().err + caplog.text
    print(err)
    assert code == 0, err
    assert "--upscale 2 is ignored" in err and str(written) in err   # the scheduler beside the checkpoint
    out = np.asarray(Image.open(tmp_path / "out" / "frog.png").convert("RGB"))
    assert out.shape == src.shape                                         # the input size, upscale forced to 1
    gray = gray_condition(src)[..., 0].astype(int)
    y = np.asarray(Image.fromarray(out).convert("L"), int)
    print(f"output luma vs the gray input: mean |diff| {np.abs(y - gray).mean():.2f}")
    assert np.abs(y - gray).mean() < 3          # the input's luma, up to the clipping of strong chroma
