"""Bad data never stops a run: each case is converted or skipped, and the counts are exact."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pasd_jax import image_io
from pasd_jax.image_io import CONVERT_KINDS, SKIP_REASONS, SkipRecord, check_array, decode_rgb
from data_pipeline.loader import MakePair, count_summary, make_train_iterator, probe
from data_pipeline.presets import PASD
from data_pipeline.sources import FolderSource

CROP = 128  # small crops keep the loader runs cheap; the contract tests use 512


def _save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h=160, w=150, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


GOOD = _save(Image.fromarray(_rgb()))


def test_rgb_png_is_unchanged():
    img, kind = decode_rgb(GOOD)
    assert kind is None and np.array_equal(img, _rgb())


def test_corrupt_bytes_are_skipped():
    for data in (b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40):
        with pytest.raises(SkipRecord) as e:
            decode_rgb(data)
        assert e.value.reason == "corrupt"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_skipped(fmt):
    data = _save(Image.fromarray(_rgb()), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    with pytest.raises(SkipRecord) as e:
        decode_rgb(data[: len(data) // 2])
    assert e.value.reason == "truncated"


def test_grey_alpha_palette_cmyk_are_converted():
    rgb = _rgb()
    gray = Image.fromarray(rgb[:, :, 0])
    img, kind = decode_rgb(_save(gray))
    assert kind == "gray" and np.array_equal(img, np.repeat(rgb[:, :, :1], 3, 2))
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]))
    img, kind = decode_rgb(_save(rgba))
    assert kind == "alpha" and np.array_equal(img, rgb)  # alpha dropped, as PASD's convert('RGB')
    pal = Image.fromarray(rgb).quantize(16)
    img, kind = decode_rgb(_save(pal))
    assert kind == "palette" and np.array_equal(img, np.asarray(pal.convert("RGB")))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    img, kind = decode_rgb(_save(cmyk, "JPEG", quality=95))
    assert kind == "other_mode" and img.shape == rgb.shape and img.dtype == np.uint8


def test_16bit_images_keep_their_top_byte():
    g16 = np.random.default_rng(1).integers(0, 65536, (100, 90), dtype=np.uint16)
    ok, buf = cv2.imencode(".png", g16)
    img, kind = decode_rgb(buf.tobytes())
    assert kind == "high_bit_depth" and np.array_equal(img, np.repeat((g16 >> 8).astype(np.uint8)[:, :, None], 3, 2))
    rgb16 = np.random.default_rng(2).integers(0, 65536, (100, 90, 3), dtype=np.uint16)
    ok, buf = cv2.imencode(".png", rgb16[:, :, ::-1])  # cv2 writes BGR
    img, kind = decode_rgb(buf.tobytes())
    assert kind == "high_bit_depth" and np.array_equal(img, (rgb16 >> 8).astype(np.uint8))


def test_decompression_bombs_are_skipped(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 160 x 150 now counts as a bomb
    with pytest.raises(SkipRecord) as e:
        decode_rgb(GOOD)
    assert e.value.reason == "too_large"


def test_tiny_and_float_images_are_skipped():
    with pytest.raises(SkipRecord) as e:
        decode_rgb(_save(Image.fromarray(_rgb(20, 300))), min_side=32)
    assert e.value.reason == "tiny"
    fimg = Image.fromarray(np.random.default_rng(0).random((40, 40)).astype(np.float32), mode="F")
    with pytest.raises(SkipRecord) as e:
        decode_rgb(_save(fimg, "TIFF"))
    assert e.value.reason == "unsupported_mode"


def test_in_memory_arrays():
    rgb = _rgb(40, 40)
    same, kind = check_array(rgb)
    assert kind is None and np.array_equal(same, rgb)
    assert check_array(rgb[:, :, 0])[1] == "gray"
    assert check_array(np.dstack([rgb, rgb[:, :, :1]]))[1] == "alpha"
    a16, kind = check_array((rgb.astype(np.uint16) << 8) | 0xFF)
    assert kind == "high_bit_depth" and np.array_equal(a16, rgb)
    for bad, reason in ((rgb.astype(np.float32), "unsupported_mode"), (rgb[:10], "tiny")):
        with pytest.raises(SkipRecord) as e:
            check_array(bad, min_side=32)
        assert e.value.reason == reason


def _bad_folder(tmp_path):
    """Seven records in source order; expected per-record outcomes noted."""
    rgb = _rgb(CROP + 20, CROP + 10)
    g16 = np.random.default_rng(1).integers(0, 65536, (CROP + 4, CROP + 4, 3), dtype=np.uint16)
    ok, rgb48 = cv2.imencode(".png", g16)
    full = _save(Image.fromarray(rgb))
    files = {
        "0_good.png": full,
        "1_corrupt.png": b"garbage" * 10,
        "2_truncated.png": full[: len(full) // 3],
        "3_good.png": _save(Image.fromarray(_rgb(CROP, CROP, 3))),
        "4_tiny.png": _save(Image.fromarray(_rgb(8, 8))),
        "5_gray.png": _save(Image.fromarray(rgb[:, :, 1])),
        "6_rgb48.png": rgb48.tobytes(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name.replace(".png", ".txt")).write_text(name)
    return FolderSource(tmp_path)


# record i -> (skips, conversions) when making the element that starts at record i:
# a failed record is replaced by the next one in source order
EXPECTED = {
    0: ({}, {}),
    1: ({"corrupt": 1, "truncated": 1}, {}),  # 1 fails, 2 fails, 3 is used
    2: ({"truncated": 1}, {}),
    3: ({}, {}),
    4: ({"tiny": 1}, {"gray": 1}),  # 4 fails, 5 is converted and used
    5: ({}, {"gray": 1}),
    6: ({}, {"high_bit_depth": 1}),
}


def _vec(d, names):
    return np.array([d.get(n, 0) for n in names], np.int32)


def test_each_record_gives_exact_counts(tmp_path):
    src = _bad_folder(tmp_path)
    mk = MakePair([src], PASD, None, CROP, True, 32, 8)
    for i, (skips, convs) in EXPECTED.items():
        out = mk.random_map((0, i), np.random.default_rng(i))
        np.testing.assert_array_equal(out["skip_counts"], _vec(skips, SKIP_REASONS), err_msg=str(i))
        np.testing.assert_array_equal(out["convert_counts"], _vec(convs, CONVERT_KINDS), err_msg=str(i))
        assert out["hq"].shape == (CROP, CROP, 3)


def test_read_errors_are_counted(tmp_path):
    src = _bad_folder(tmp_path)
    (tmp_path / "0_good.png").unlink()  # vanishes after indexing
    out = MakePair([src], PASD, None, CROP, True, 32, 8).random_map((0, 0), np.random.default_rng(0))
    expected = _vec({"read_error": 1, "corrupt": 1, "truncated": 1}, SKIP_REASONS)
    np.testing.assert_array_equal(out["skip_counts"], expected)


def test_loader_epoch_totals_are_exact(tmp_path):
    src = _bad_folder(tmp_path)
    with make_train_iterator({"crop_size": CROP}, seed=3, process_index=0, process_count=1, batch_size=7,
                             tokenizer_path=None, num_workers=0, source=src) as it:
        batch = next(it)  # one batch = one epoch: every record starts exactly one element
    totals = count_summary(batch)
    want = {f"skipped/{r}": 0 for r in SKIP_REASONS} | {f"converted/{k}": 0 for k in CONVERT_KINDS}
    for skips, convs in EXPECTED.values():
        for r, v in skips.items():
            want[f"skipped/{r}"] += v
        for k, v in convs.items():
            want[f"converted/{k}"] += v
    assert totals == want
    assert batch["skip_counts"].shape == (7, len(SKIP_REASONS)) and batch["skip_counts"].dtype == np.int32


def test_too_many_consecutive_failures_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(GOOD)
    for i in range(6):
        (tmp_path / f"b{i}.png").write_bytes(b"junk")
    src = FolderSource(tmp_path)
    mk = MakePair([src], PASD, None, CROP, True, 32, 3)
    with pytest.raises(RuntimeError, match="consecutive"):
        mk.random_map((0, 1), np.random.default_rng(0))


def test_empty_source_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        make_train_iterator(None, seed=0, process_index=0, process_count=1, batch_size=1, tokenizer_path=None,
                            source=FolderSource(tmp_path))


def test_all_failing_source_fails_at_start(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"junk" * i)
    with pytest.raises(ValueError, match="every probed record"):
        make_train_iterator(None, seed=0, process_index=0, process_count=1, batch_size=1, tokenizer_path=None,
                            source=FolderSource(tmp_path))
    with pytest.raises(ValueError, match="every probed record"):
        probe(FolderSource(tmp_path), 16, 1)


def test_skip_reasons_are_stable_names():
    # training logs these names; renaming one silently breaks dashboards
    assert image_io.SKIP_REASONS == ("read_error", "corrupt", "truncated", "too_large", "unsupported_mode", "tiny")
    assert image_io.CONVERT_KINDS == ("gray", "alpha", "palette", "high_bit_depth", "other_mode")
