"""The evaluation report on small folders (CPU, no torch): pairing, skipped pairs with reasons, the files written,
learned metrics through an injected stand-in for pyiqa, and a missing-weights failure that leaves the rest running."""
from __future__ import annotations

import csv
import json
import sys
import types
import urllib.error

import numpy as np
import pytest
from PIL import Image

from pasd_jax.evaluate import cli
from pasd_jax.evaluate.learned import _url_and_file
from pasd_jax.evaluate.niqe import niqe
from pasd_jax.evaluate.psnr_ssim import psnr, ssim
from pasd_jax.evaluate.registry import FULL_REFERENCE, SET_LEVEL


def _image(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth random picture with a little grain (NIQE needs texture, not flat or white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.float64)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def _noisy(img: np.ndarray, seed: int) -> np.ndarray:
    return np.clip(img + np.random.default_rng(seed).normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def _save(path, img) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


@pytest.fixture()
def folders(tmp_path):
    """GT a..d (200x128); predictions: a fine, b 4x2 px too large, c corrupt, d missing, extra.png unpaired."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    images = {k: _image(200, 128, i) for i, k in enumerate("abcd")}
    for k, img in images.items():
        _save(gt / f"{k}.png", img)
    preds = {"a": _noisy(images["a"], 10), "b": np.pad(_noisy(images["b"], 11), ((0, 2), (0, 4), (0, 0)), "edge")}
    _save(pred / "a.png", preds["a"])
    _save(pred / "b.png", preds["b"])
    (pred / "c.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    _save(pred / "extra.png", _image(200, 128, 9))
    (pred / "notes.txt").write_text("not an image")
    return tmp_path, images, preds


def _run(argv, **kw):
    return cli.main([*argv, "--no-progress"], **kw)


def test_report_lists_every_skipped_pair(folders, capsys):
    root, gts, preds = folders
    out = root / "report"
    rc = _run(["--pred", str(root / "pred"), "--gt", str(root / "gt"), "--out", str(out), "--crop-border", "4"])
    err = capsys.readouterr().err
    assert rc == 1  # report written, but incomplete
    report = json.loads((out / "metrics.json").read_text())
    assert list(report["images"]) == ["a.png"]
    reasons = {(s["pred"], s["gt"]): s["reason"] for s in report["skipped"]}
    assert len(report["skipped"]) == 4
    assert "no ground truth" in reasons[("extra.png", None)]
    assert "204x130" in reasons[("b.png", "b.png")] and "200x128" in reasons[("b.png", "b.png")]
    assert "--crop-to-gt" in reasons[("b.png", "b.png")]
    assert "c.png" in reasons[("c.png", "c.png")] and "damaged or truncated" in reasons[("c.png", "c.png")]
    assert "no prediction for d.png" in reasons[(None, "d.png")]
    assert all(r in err for r in reasons.values())  # each one also said when it happened
    assert "4 pairs skipped" in err
    # the values are our metric functions' on the one good pair, with the crop border
    a_pred, a_gt = preds["a"], gts["a"]
    expected = {"psnr": psnr(a_pred, a_gt, 4), "ssim": ssim(a_pred, a_gt, 4),
                "psnr_y": psnr(a_pred, a_gt, 4, y_channel=True), "ssim_y": ssim(a_pred, a_gt, 4, y_channel=True),
                "niqe": niqe(a_pred, 4)}
    assert report["images"]["a.png"] == expected and report["mean"] == expected
    assert report["counts"] == {m: 1 for m in expected}
    assert report["settings"]["crop_border"] == 4 and report["settings"]["directions"]["niqe"] == "lower"
    assert report["not_images"] == {str(root / "pred"): 1}  # notes.txt, counted
    rows = list(csv.reader((out / "per_image.csv").open()))
    assert rows[0] == ["method", "image", "psnr", "ssim", "psnr_y", "ssim_y", "niqe"]
    assert rows[1][:2] == ["pred", "a.png"] and float(rows[1][2]) == expected["psnr"] and len(rows) == 2
    table = (out / "table.md").read_text()
    assert table.startswith("| Dataset | Method | PSNR↑ | SSIM↑ | PSNR (Y)↑ | SSIM (Y)↑ | NIQE↓ |")
    assert f"| gt | pred | {expected['psnr']:.2f} | {expected['ssim']:.4f} |" in table
    assert "4 skipped" in table


def test_crop_to_gt_and_selected_metrics(folders):
    root, gts, preds = folders
    out = root / "report"
    rc = _run(["--pred", f"mine={root / 'pred'}", "--gt", str(root / "gt"), "--out", str(out),
               "--metrics", "psnr_y,SSIM_Y", "--crop-to-gt"])
    assert rc == 1  # c, d and extra are still skipped
    report = json.loads((out / "metrics.json").read_text())
    assert sorted(report["images"]) == ["a.png", "b.png"]
    assert report["images"]["b.png"]["psnr_y"] == psnr(preds["b"][:128, :200], gts["b"], y_channel=True)
    assert set(report["mean"]) == {"psnr_y", "ssim_y"}
    assert report["mean"]["psnr_y"] == pytest.approx(np.mean([v["psnr_y"] for v in report["images"].values()]))
    assert "| gt | mine |" in (out / "table.md").read_text()


def test_bad_arguments_write_nothing(folders, capsys):
    root, _, _ = folders
    base = ["--pred", str(root / "pred"), "--gt", str(root / "gt")]
    assert _run([*base, "--out", str(root / "r1"), "--metrics", "psnr,lpipz"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'lpipz'" in err and "psnr, ssim, psnr_y" in err and "qalign" in err
    assert not (root / "r1").exists()
    assert _run([*base, "--out", str(root / "pred" / "report")]) == 2  # inside an input
    assert "input" in capsys.readouterr().err
    (root / "r2").mkdir()
    assert _run([*base, "--out", str(root / "r2")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _run(["--pred", str(root / "nope"), "--gt", str(root / "gt"), "--out", str(root / "r3")]) == 2
    assert "nope is not a folder" in capsys.readouterr().err


def _stand_in(calls: list):
    """Stand-ins for pyiqa's scorers: simple formulas, so the values can be checked."""
    def factory(spec):
        calls.append(spec.name)
        if spec.kind == SET_LEVEL:
            def fid(pred_dir, gt_dir):
                p, g = sorted(pred_dir.iterdir()), sorted(gt_dir.iterdir())
                assert len(p) == len(g)
                return float(len(p))  # the number of evaluated pairs it was given
            return fid
        if spec.kind == FULL_REFERENCE:
            return lambda pred, gt: float(np.abs(pred.astype(int) - gt).mean())
        return lambda pred, gt=None: float(pred.mean())
    return factory


def test_learned_metrics_through_the_adapter(tmp_path):
    gts = {k: _image(200, 128, i) for i, k in enumerate("xyz")}
    preds = {"A": {k: _noisy(v, 1) for k, v in gts.items()}, "B": {k: _noisy(v, 2) // 2 * 2 for k, v in gts.items()}}
    for k, img in gts.items():
        _save(tmp_path / "gt" / "sub" / f"{k}.png", img)
        for m in preds:
            _save(tmp_path / m / f"{k}.png", preds[m][k])  # flat folders: paired by stem
    calls = []
    out = tmp_path / "report"
    rc = _run(["--pred", f"A={tmp_path / 'A'}", "--pred", f"B={tmp_path / 'B'}", "--gt", str(tmp_path / "gt"),
               "--out", str(out), "--metrics", "psnr_y,lpips,fid,musiq", "--dataset", "Toy"],
              factory=_stand_in(calls))
    assert rc == 0
    assert calls == ["lpips", "fid", "musiq"]
    report = json.loads((out / "metrics.json").read_text())
    for m in preds:
        res = report["methods"][m]
        assert sorted(res["images"]) == ["x.png", "y.png", "z.png"]
        lp = [np.abs(preds[m][k].astype(int) - gts[k]).mean() for k in "xyz"]
        assert res["mean"]["lpips"] == pytest.approx(np.mean(lp))
        assert res["mean"]["musiq"] == pytest.approx(np.mean([preds[m][k].mean() for k in "xyz"]))
        assert res["mean"]["fid"] == 3.0 and res["counts"]["fid"] == 1
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| Dataset | Method | PSNR (Y)↑ | LPIPS↓ | FID↓ | MUSIQ↑ |"
    a, b = (report["methods"][m]["mean"] for m in "AB")
    best_lpips = "A" if a["lpips"] < b["lpips"] else "B"
    row = next(line for line in table if line.startswith(f"| Toy | {best_lpips} |"))
    assert f"**{min(a['lpips'], b['lpips']):.4f}**" in row  # lower is better for LPIPS


def test_missing_weights_name_the_metric_and_file_others_still_run(tmp_path, monkeypatch, capsys):
    for k in "xy":
        img = _image(200, 128, ord(k))
        _save(tmp_path / "gt" / f"{k}.png", img)
        _save(tmp_path / "pred" / f"{k}.png", _noisy(img, 3))
    fake = types.ModuleType("fake_weights_download")

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    fake.download_url_to_file = offline
    monkeypatch.setitem(sys.modules, "fake_weights_download", fake)
    url, dst = "https://example.org/weights/DISTS_weights-f5e65c96.pth", str(tmp_path / "cache" / "DISTS.pth")
    good = _stand_in([])

    def factory(spec):
        if spec.name == "dists":  # loads its checkpoint the way pyiqa does: through the module's function
            sys.modules["fake_weights_download"].download_url_to_file(url, dst)
        return good(spec)

    out = tmp_path / "report"
    rc = _run(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out),
               "--metrics", "psnr,dists,lpips"], factory=factory,
              download_hooks=[("fake_weights_download", "download_url_to_file", _url_and_file)])
    assert rc == 1
    assert sys.modules["fake_weights_download"].download_url_to_file is offline  # the watch is undone
    report = json.loads((out / "metrics.json").read_text())
    why = report["failed_metrics"]["dists"]
    assert why.startswith("dists:") and dst in why and url in why and "place the file at that path" in why
    assert "Temporary failure in name resolution" in why
    assert why in capsys.readouterr().err
    assert set(report["mean"]) == {"psnr", "dists", "lpips"} and report["mean"]["dists"] is None
    assert all(set(v) == {"psnr", "lpips"} for v in report["images"].values()) and len(report["images"]) == 2
    assert "dists: not computed: dists:" in (out / "table.md").read_text()


def test_without_pyiqa_learned_metrics_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import fails as if not installed
    from pasd_jax.evaluate.learned import pyiqa_factory
    from pasd_jax.evaluate.registry import METRICS
    with pytest.raises(Exception, match=r"lpips needs pyiqa and torch: pip install 'pasd-jax\[eval\]'"):
        pyiqa_factory()(METRICS["lpips"])


def test_failure_messages_for_hub_models_and_missing_packages():
    from pasd_jax.evaluate.learned import explain_failure
    from pasd_jax.evaluate.registry import METRICS
    hub = explain_failure(METRICS["qalign"], OSError("We couldn't connect to 'https://huggingface.co'"), [])
    assert "huggingface-cli download q-future/one-align" in str(hub) and "models--q-future--one-align" in str(hub)
    pkg = explain_failure(METRICS["clipiqa"], ModuleNotFoundError("No module named 'clip'"), [])
    assert str(pkg).startswith("clipiqa:") and "pasd-jax[eval]" in str(pkg)


def test_names_shared_by_two_files_are_reported(tmp_path):
    img = _image(200, 128, 5)
    for path in ["gt/a.png", "gt/a.jpg", "gt/b.png", "pred/a.png", "pred/b.png", "pred/b.webp"]:
        _save(tmp_path / path, img)
    out = tmp_path / "report"
    assert _run(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out)]) == 1
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == {}
    reasons = sorted(s["reason"] for s in report["skipped"])
    assert len(reasons) == 3  # pred a (two GTs), pred b (two predictions) and GT b (no usable prediction)
    assert any("several ground truths share the name a (a.jpg, a.png)" in r for r in reasons)
    assert any("several predictions share the name b (b.png, b.webp)" in r for r in reasons)


def test_pairing_by_path_then_stem_then_resolution_tag(tmp_path):
    from pasd_jax.evaluate.pairing import match, scan
    for path in ["gt/s/Canon_001_HR.png", "gt/s/0801.png", "gt/x.png", "gt/y.png",
                 "pred/Canon_001_LR4.png", "pred/s/0801.jpg", "pred/sub/x.png", "pred/q.png", "pred/.hidden/y.png"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"")
    pairs, orphans = match(scan(tmp_path / "pred"), scan(tmp_path / "gt"))
    assert pairs == {"s/0801": "s/0801", "x": "sub/x", "s/Canon_001_HR": "Canon_001_LR4"}
    assert orphans == ["q"]  # and the hidden folder is not looked at
