"""`pasd-evaluate sweep` on the tiny golden models: one compiled sampling program serves every ANS level, each
level's results are pasd-sample's (same seeds, preprocessing and colour fix), and sweep.json / sweep.png / the
report cover every level; a rerun scores again without loading weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pasd_jax.evaluate import cli, sweep, sweep_plot

LEVELS = (100, 500, 900)
SAMPLING = ["--steps", "2", "--dtype", "float32", "--process-size", "64", "--no-cache", "--no-compile-cache",
            "--no-progress", "--plotter", "pil"]


def _data(shared_dir, root):
    """GT: 64x64 crops of two Set5 images; LQ: their bicubic 2x reductions (32x32)."""
    for name, (x, y) in {"bird": (100, 60), "butterfly": (90, 90)}.items():
        src = Image.open(shared_dir / "examples" / "Set5" / f"{name}.png").convert("RGB")
        gt = src.crop((x, y, x + 64, y + 64))
        (root / "gt").mkdir(parents=True, exist_ok=True)
        (root / "lq").mkdir(parents=True, exist_ok=True)
        gt.save(root / "gt" / f"{name}.png")
        gt.resize((32, 32), Image.BICUBIC).save(root / "lq" / f"{name}.png")


def _sharpness(pred, gt=None) -> float:
    """A stand-in for a learned no-reference metric (mean gradient magnitude of the luma)."""
    y = pred.astype(np.float64).mean(-1)
    return float(np.abs(np.diff(y, axis=0)).mean() + np.abs(np.diff(y, axis=1)).mean())


@pytest.mark.slow  # 14-45 s on 2 shared cores, most of it the one compilation of the tiny sampler
def test_sweep_one_program_for_every_level(golden_dir, shared_dir, tmp_path, monkeypatch, capsys):
    _data(shared_dir, tmp_path)
    made = []

    def show(*a):  # measured values, past capsys (which holds the CLI's output for the asserts)
        with capsys.disabled():
            print(*a)

    class Recording(sweep.PASDPipeline):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(sweep, "PASDPipeline", Recording)
    out = tmp_path / "sweep"
    argv = ["sweep", "--ckpt", str(golden_dir / "tiny_pasd"), "--base", str(golden_dir / "tiny_pipeline"),
            "--lq", str(tmp_path / "lq"), "--gt", str(tmp_path / "gt"), "--out", str(out),
            "--levels", *map(str, LEVELS[::-1]), *SAMPLING]
    rc = cli.main([*argv, "--perceptual", "musiq"], factory=lambda spec: _sharpness)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (pipe,) = made
    show("traces:", dict(pipe.trace_counts))
    assert pipe.trace_counts["untiled"] == 1  # 3 levels x 2 images of one processed size: one program

    for level in LEVELS:
        names = sorted(p.name for p in (out / f"level_{level}").iterdir())
        assert names == ["bird.png", "butterfly.png"]
        assert Image.open(out / f"level_{level}" / "bird.png").size == (64, 64)  # upscale 2 from GT / LQ
    low, high = (np.asarray(Image.open(out / f"level_{lv}" / "bird.png")).astype(int) for lv in (100, 900))
    show(f"level 100 vs 900: mean |diff| {np.abs(low - high).mean():.2f} levels")
    assert np.abs(low - high).max() > 0  # the level reaches the program

    # A level's result is pasd-sample's for --added-noise-level 500: per-image key, official preprocessing,
    # default prompts, wavelet colour fix; the direct call reuses the compiled program.
    from pasd_jax.prompts import DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT, build_prompt_fn
    from pasd_jax.sampling import SamplingOptions, tasks
    from pasd_jax.sampling.runner import image_key

    rgb = np.asarray(Image.open(tmp_path / "lq" / "bird.png").convert("RGB"))
    prepared = tasks.prepare(tasks.SR, rgb, 2, 64)
    prompt = build_prompt_fn("none", prompt="", added_prompt=DEFAULT_ADDED_PROMPT)(Image.fromarray(rgb), "bird.png")
    direct = pipe.sample(prepared.lq[None], [prompt], [DEFAULT_NEGATIVE_PROMPT], image_key(0, "bird.png")[None],
                         SamplingOptions(steps=2, dtype="float32", added_noise_level=500))[0]
    expect = tasks.finish(tasks.SR, direct, prepared, "wavelet")
    got = np.asarray(Image.open(out / "level_500" / "bird.png"))
    diff = np.abs(got.astype(int) - expect.astype(int)).max()
    show(f"sweep level 500 vs the pipeline called directly: max |diff| {diff}")
    assert diff == 0 and pipe.trace_counts["untiled"] == 1

    record = json.loads((out / "sweep.json").read_text())
    show("psnr_y per level:", record["fidelity"]["values"], "stand-in perceptual:", record["perceptual"]["values"])
    assert record["levels"] == list(LEVELS)  # sorted
    assert set(record["per_level"]) == {str(lv) for lv in LEVELS}
    assert record["sampling"]["programs"]["untiled"] == 1
    report = json.loads((out / "report" / "metrics.json").read_text())
    for i, level in enumerate(LEVELS):
        mean = report["methods"][f"level_{level}"]["mean"]
        assert record["fidelity"]["values"][i] == mean["psnr_y"]
        assert record["perceptual"]["values"][i] == mean["musiq"]
        assert record["per_level"][str(level)]["scored"] == 2 and record["per_level"][str(level)]["sampled"] == 2
    lv100 = np.mean([_sharpness(np.asarray(Image.open(out / "level_100" / f"{n}.png").convert("RGB")))
                     for n in ("bird", "butterfly")])
    assert record["perceptual"]["values"][0] == pytest.approx(lv100, rel=1e-12)
    table = (out / "report" / "table.md").read_text()
    assert all(f"| level_{lv} |" in table for lv in LEVELS)
    with Image.open(out / "sweep.png") as plot:
        plot.verify()
        assert plot.format == "PNG" and plot.size[0] >= 600

    # Again with the default perceptual metric: every result is there, so no weight is read; NIQE cannot score
    # 64x64 images and says why, the plot is still written, the exit status says incomplete.
    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr(sweep, "load_for_sampling", no_weights)
    (out / "sweep.png").unlink()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and "metric errors" in err
    record = json.loads((out / "sweep.json").read_text())
    assert record["perceptual"]["metric"] == "niqe" and record["perceptual"]["values"] == [None] * 3
    assert "192x96" in record["perceptual"]["why_missing"]
    assert all(v is not None for v in record["fidelity"]["values"])
    assert (out / "sweep.png").is_file()


def test_sweep_bad_arguments_before_any_weight(tmp_path, monkeypatch, capsys):
    (tmp_path / "lq").mkdir()
    (tmp_path / "gt").mkdir()
    monkeypatch.setattr(sweep, "load_for_sampling", lambda *a, **k: pytest.fail("weights were loaded"))
    base = ["sweep", "--ckpt", "x", "--lq", str(tmp_path / "lq"), "--gt", str(tmp_path / "gt")]
    cases = [(["--out", str(tmp_path / "o"), "--levels", "1000"], "[0, 999]"),
             (["--out", str(tmp_path / "o"), "--perceptual", "psnr_y"], "two different"),
             (["--out", str(tmp_path / "lq" / "o")], "lies inside the input"),
             (["--out", str(tmp_path / "o")], "no LQ image"),
             (["--out", str(tmp_path / "o"), "--upscale", "2", "--steps", "0"], "steps")]
    for extra, message in cases:
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err, err


def test_upscale_from_the_size_ratio(tmp_path):
    for folder, size in [("lq", (20, 10)), ("gt", (80, 40))]:
        (tmp_path / folder).mkdir()
        Image.new("RGB", size).save(tmp_path / folder / "a.png")
    assert sweep.infer_upscale(tmp_path / "lq", tmp_path / "gt") == 4
    Image.new("RGB", (20, 20)).save(tmp_path / "lq" / "b.png")
    Image.new("RGB", (50, 50)).save(tmp_path / "gt" / "b.png")
    with pytest.raises(sweep.EvaluationError, match="pass --upscale"):
        sweep.infer_upscale(tmp_path / "lq", tmp_path / "gt")


def test_plot_both_axes_and_missing_values(tmp_path):
    series = [sweep_plot.Series("PSNR (Y)", True, [25.0, 24.0, 23.0]),
              sweep_plot.Series("NIQE", False, [6.0, None, 4.0])]
    assert sweep_plot.plot(tmp_path / "p.png", [100, 500, 900], series, "t", "pil") == "pil"
    img = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")).astype(int)
    blue = (np.abs(img - (31, 119, 180)).sum(-1) < 30).sum()
    red = (np.abs(img - (214, 39, 40)).sum(-1) < 30).sum()
    print("blue / red pixels:", blue, red)
    assert blue > 200 and red > 200  # both metrics drawn, each in its colour
    assert sweep_plot.nice_ticks(23.1, 25.7) == [23.0, 24.0, 25.0, 26.0]
    if sweep_plot.have_matplotlib():
        assert sweep_plot.plot(tmp_path / "m.png", [100, 500, 900], series, "t", "matplotlib") == "matplotlib"
        assert Image.open(tmp_path / "m.png").format == "PNG"


def test_cli_forms(tmp_path, capsys):
    """`report` names the default form; --list-metrics needs no folders; sweep is its own parser."""
    assert cli.main(["--list-metrics"]) == 0 and "niqe" in capsys.readouterr().out
    assert cli.main(["report", "--list-metrics"]) == 0 and "table1" in capsys.readouterr().out
    (tmp_path / "p").mkdir()
    assert cli.main(["report", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "missing"),
                     "--out", str(tmp_path / "r")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--pred", "x"])  # argparse: the sweep's required flags
    assert "--ckpt" in capsys.readouterr().err
