"""Comparison pictures: the same zoomed crop under every column, LQ by nearest and bicubic, labels, and the CLI's
--grid output (one PNG per GT image)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pasd_jax.evaluate import cli
from pasd_jax.evaluate.grid import Panel, auto_crop, comparison, lq_panels

W, H, PAD = 120, 80, 4


def _textured(seed: int = 0) -> np.ndarray:
    """Flat grey except a noisy 24x24 square at (x=70, y=40)."""
    img = np.full((H, W, 3), 128, np.uint8)
    img[40:64, 70:94] = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    return img


def test_auto_crop_finds_the_detail():
    x, y, s = auto_crop(_textured())
    assert s == 20  # a quarter of the short side
    assert 70 <= x and x + s <= 94 and 40 <= y and y + s <= 64
    assert auto_crop(_textured(), size=500)[2] == H  # never larger than the image


def test_every_column_shows_the_same_crop():
    gt = _textured()
    result = np.clip(gt.astype(int) + 7, 0, 255).astype(np.uint8)
    lq = np.asarray(Image.fromarray(gt).resize((W // 4, H // 4), Image.BICUBIC))
    panels = [*lq_panels(lq, (W, H)), Panel("PASD", result, "psnr_y 30.1"), Panel("gone", None, "missing"),
              Panel("GT", gt)]
    width, crop = 96, (72, 42, 16)
    pic = np.asarray(comparison(panels, crop, width))
    full_h = round(H * width / W)
    assert pic.shape[1] == len(panels) * (width + PAD) + PAD
    x, y, s = crop
    for i, panel in enumerate(panels):
        left, zoom_top = PAD + i * (width + PAD), PAD + full_h + PAD
        zoom = pic[zoom_top:zoom_top + width, left:left + width]
        if panel.image is None:
            assert (zoom == 200).all()  # the grey placeholder
            continue
        expected = np.asarray(Image.fromarray(panel.image[y:y + s, x:x + s]).resize((width, width), Image.NEAREST))
        np.testing.assert_array_equal(zoom, expected)
        box_left = left + round(x * width / W)
        assert tuple(pic[PAD + round(y * full_h / H), box_left]) == (255, 0, 0)  # the crop is boxed on the full view
    nearest = panels[0].image
    assert nearest.shape == gt.shape and (nearest[:4, :4] == nearest[0, 0]).all()  # 4x4 blocks: nearest neighbour
    label_rows = pic[PAD + full_h + PAD + width + PAD:]
    assert (label_rows < 128).any()  # some text was drawn


def test_cli_writes_one_picture_per_gt(tmp_path, capsys):
    for k in ("a", "sub/b"):
        gt = _textured(len(k))
        for folder, img in [("gt", gt), ("pred", np.clip(gt.astype(int) + 5, 0, 255).astype(np.uint8)),
                            ("lq", np.asarray(Image.fromarray(gt).resize((W // 4, H // 4))))]:
            path = tmp_path / folder / (f"{k}.png" if folder != "lq" else f"{k}x4.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
    out = tmp_path / "report"
    rc = cli.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--lq", str(tmp_path / "lq"),
                   "--out", str(out), "--metrics", "psnr", "--grid", "--grid-width", "64", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    pictures = sorted(p.relative_to(out / "grid").as_posix() for p in (out / "grid").rglob("*.png"))
    assert pictures == ["a.png", "sub/b.png"]
    pic = Image.open(out / "grid" / "a.png")
    assert pic.size[0] == 4 * (64 + PAD) + PAD  # LQ nearest, LQ bicubic, pred, GT
    assert "2 pictures" in capsys.readouterr().out


@pytest.mark.parametrize("crop,msg", [("1,2", "X,Y,SIZE"), ("-1,0,8", ">= 0")])
def test_bad_grid_crop(tmp_path, capsys, crop, msg):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    rc = cli.main(["--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g"), "--out", str(tmp_path / "r"),
                   "--grid", f"--grid-crop={crop}"])
    assert rc == 2 and msg in capsys.readouterr().err
