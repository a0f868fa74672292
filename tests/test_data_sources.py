"""Folder, tar-shard, TFDS ArrayRecord, procedural and mixed sources, built in the test from a few images."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipeline import sources
from pasd_jax.tokenizer import load_tokenizer
from data_pipeline.loader import MakePair, reference_stream
from data_pipeline.presets import PASD

CROP = 512


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt],
                              **({"quality": 95} if fmt != "png" else {}))
    return buf.getvalue()


def _image(i: int, size: int = CROP) -> np.ndarray:
    """Distinct, left-right asymmetric images (so a flip is visible)."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([(xx * 255 // size), (yy * 255 // size), np.full_like(xx, 40 * i)], -1)
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def tokenizer_path(golden_dir):
    return str(golden_dir / "tiny_pipeline" / "tokenizer")


def _check_pair(pair, img, caption, tokenizer_path):
    hq, lq = pair["hq"], pair["lq"]
    assert hq.shape == lq.shape == (CROP, CROP, 3) and hq.dtype == lq.dtype == np.uint8
    assert np.array_equal(hq, img) or np.array_equal(hq, img[:, ::-1])  # a 512 image: crop = all, maybe flipped
    assert float(np.abs(lq.astype(float) - hq).mean()) < 40  # degraded, still the same picture
    tok = load_tokenizer(tokenizer_path)
    assert pair["input_ids"].shape == (77,) and pair["input_ids"].dtype == np.int32
    assert tok.decode(pair["input_ids"], skip_special_tokens=True).strip() == caption
    assert pair["skip_counts"].sum() == 0


def _pairs(src, tokenizer_path, n):
    mk = MakePair([src], PASD, tokenizer_path, CROP, True, 32, 4)
    return [mk.random_map((0, i), np.random.default_rng(i)) for i in range(n)]


def test_folder_source_recursive_with_first_line_captions(tmp_path, tokenizer_path):
    imgs = [_image(i) for i in range(3)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "x.png").write_bytes(_encode(imgs[0], "png"))
    (tmp_path / "a" / "x.txt").write_text("a red house\nsecond line is ignored\n")
    (tmp_path / "b" / "c" / "y.jpg").write_bytes(_encode(imgs[1], "jpg"))
    (tmp_path / "b" / "c" / "y.txt").write_text("a blue car")
    (tmp_path / "z.webp").write_bytes(_encode(imgs[2], "webp"))  # no caption file
    (tmp_path / "ignored.bmp").write_bytes(b"BM")
    (tmp_path / "orphan.txt").write_text("no image")
    src = sources.FolderSource(tmp_path)
    assert len(src) == 3
    assert [src[i]["key"] for i in range(3)] == ["a/x.png", "b/c/y.jpg", "z.webp"]
    assert [src[i]["caption"] for i in range(3)] == ["a red house", "a blue car", ""]
    pairs = _pairs(src, tokenizer_path, 3)
    _check_pair(pairs[0], imgs[0], "a red house", tokenizer_path)
    # jpg / webp are lossy: compare against their own decode
    for i in (1, 2):
        dec = np.asarray(Image.open(io.BytesIO(src[i]["image"])).convert("RGB"))
        _check_pair(pairs[i], dec, src[i]["caption"], tokenizer_path)


def _write_shard(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_shards_with_cached_index(tmp_path, tokenizer_path, monkeypatch):
    imgs = [_image(i) for i in range(4)]
    s0, s1 = tmp_path / "shard-000.tar", tmp_path / "shard-001.tar"
    _write_shard(s0, [("000.png", _png(imgs[0])), ("000.txt", b"a small boat\n"),
                      ("001.txt", b"a tall tree"), ("001.png", _png(imgs[1])), ("only_text.txt", b"x")])
    _write_shard(s1, [("sub/002.png", _png(imgs[2])), ("sub/002.txt", b"a green field"),
                      ("003.jpg", _encode(imgs[3], "jpg"))])
    src = sources.TarShardSource([s0, s1])
    assert len(src) == 4 and src.no_image == 1
    assert [src[i]["key"] for i in range(4)] == ["000", "001", "sub/002", "003"]
    assert [src[i]["caption"] for i in range(4)] == ["a small boat", "a tall tree", "a green field", ""]
    pairs = _pairs(src, tokenizer_path, 3)
    for i in range(3):
        _check_pair(pairs[i], imgs[i], src[i]["caption"], tokenizer_path)
    assert (tmp_path / "shard-000.tar.index.json").is_file()

    # the cached index is used (no second pass over the tar) ...
    def no_rebuild(path):
        raise AssertionError(f"index rebuilt for {path}")

    monkeypatch.setattr(sources, "build_tar_index", no_rebuild)
    again = sources.TarShardSource(str(tmp_path / "shard-*.tar"))
    assert len(again) == 4 and again[2]["caption"] == "a green field"
    # ... until the shard changes
    monkeypatch.undo()
    _write_shard(s1, [("005.png", _png(imgs[3])), ("005.txt", b"a new one")])
    st = os.stat(s1)
    os.utime(s1, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = sources.TarShardSource([s0, s1])
    assert len(changed) == 3 and changed[2]["caption"] == "a new one"


def test_tar_rejects_compressed_shards(tmp_path):
    with pytest.raises(ValueError, match="compressed"):
        sources.TarShardSource([str(tmp_path / "x.tar.gz")])


def test_tar_source_pickles_without_open_files(tmp_path):
    import pickle

    p = tmp_path / "s.tar"
    _write_shard(p, [("a.png", _png(_image(0, 64))), ("a.txt", b"cap")])
    src = sources.TarShardSource([p])
    assert src[0]["caption"] == "cap"  # opens a descriptor
    clone = pickle.loads(pickle.dumps(src))
    assert clone._fds == {} and clone[0]["image"] == src[0]["image"]


def test_procedural_source_is_deterministic_and_captioned():
    a, b = sources.ProceduralSource(4, 96, seed=1), sources.ProceduralSource(4, 96, seed=1)
    r0, r1 = a[0], b[0]
    assert np.array_equal(r0["image"], r1["image"]) and r0["caption"] == r1["caption"]
    assert r0["image"].shape == (96, 96, 3) and r0["image"].dtype == np.uint8
    assert not np.array_equal(a[0]["image"], a[1]["image"])
    assert not np.array_equal(a[0]["image"], sources.ProceduralSource(4, 96, seed=2)[0]["image"])
    assert "gradient" in r0["caption"] and r0["image"].std() > 10
    with pytest.raises(IndexError):
        a[4]


def test_mixture_follows_weights_and_covers_each_epoch():
    # (grain's index shuffle is slow for tiny domains, so these sources are not tiny)
    mix = sources.Mixture((sources.ProceduralSource(300, 8), sources.ProceduralSource(100, 8)), (3.0, 1.0))
    refs = reference_stream(mix, seed=0)
    drawn = [refs[i] for i in range(4000)]
    comp = np.array([c for c, _ in drawn])
    assert abs(np.mean(comp == 0) - 0.75) < 0.01
    # within a component, each epoch is a permutation of its records, reshuffled every epoch
    ones = [i for c, i in drawn if c == 1]
    assert sorted(ones[:100]) == list(range(100)) and sorted(ones[100:200]) == list(range(100))
    assert ones[:100] != ones[100:200]
    assert drawn[:500] == [refs[i] for i in range(500)]  # random access is deterministic


def test_sources_from_config_specs(tmp_path):
    from data_pipeline.loader import sources_from_config

    (tmp_path / "a.png").write_bytes(_png(_image(0, 64)))
    _write_shard(tmp_path / "s.tar", [("k.png", _png(_image(1, 64))), ("k.txt", b"cap")])
    mix = sources_from_config([
        {"kind": "folder", "path": str(tmp_path), "weight": 2.0},
        {"kind": "tar", "shards": str(tmp_path / "*.tar"), "weight": 1.0},
        {"kind": "procedural", "n": 5, "size": 32, "seed": 1},
    ])
    assert [type(s).__name__ for s in mix.sources] == ["FolderSource", "TarShardSource", "ProceduralSource"]
    assert mix.weights == (2.0, 1.0, 1.0) and mix.sources[1][0]["caption"] == "cap"
    with pytest.raises(ValueError, match="unknown source kind"):
        sources_from_config([{"kind": "webdataset-url"}])
    with pytest.raises(ValueError, match="no sources"):
        sources_from_config([])
