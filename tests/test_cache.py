"""The converted-weights cache (issue 6, item 4): a second load does not convert; a bad entry is rebuilt."""
from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import pasd_jax.convert.base as base_mod
from pasd_jax.convert.base import load_model_folder, load_sd_base
from pasd_jax.convert.cache import (ENV, CacheEntryError, ConversionCache, default_cache_dir, load_flax_params,
                                    resolve_cache, save_flax_params)
from pasd_jax.convert.release import load_checkpoint


def _same(a, b) -> bool:
    fa, fb = flatten_dict(a), flatten_dict(b)
    return fa.keys() == fb.keys() and all(np.asarray(fa[k]).tobytes() == np.asarray(fb[k]).tobytes() for k in fa)


def _entries(cache: ConversionCache) -> list[pathlib.Path]:
    return sorted(cache.root.glob("*.safetensors"))


@pytest.fixture()
def tiny_unet(golden_dir, tmp_path):
    """A private copy of the tiny PASD UNet folder (tests change its files)."""
    src = golden_dir / "tiny_pasd" / "unet"
    dst = tmp_path / "unet"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_second_load_does_not_convert(tiny_unet, tmp_path, monkeypatch):
    cache = ConversionCache(tmp_path / "cache")
    seen = []
    cache.hooks.append(seen.append)
    m1, p1 = load_model_folder(tiny_unet, cache=cache)
    assert (cache.stats.conversions, cache.stats.hits) == (1, 0) and len(seen) == 1

    def no_reading(*a, **k):
        raise AssertionError("the source weights were read again")

    monkeypatch.setattr(base_mod, "load_weights", no_reading)
    m2, p2 = load_model_folder(tiny_unet, cache=cache)
    print("cache stats after two loads:", cache.stats)
    assert (cache.stats.conversions, cache.stats.hits) == (1, 1) and len(seen) == 1
    assert m1 == m2 and _same(p1, p2)
    assert len(_entries(cache)) == 1 and not list(cache.root.glob(".*tmp"))


def test_official_checkpoint_and_single_file_are_cached(golden_dir, tmp_path):
    cache = ConversionCache(tmp_path / "cache")
    first = load_checkpoint(golden_dir / "tiny_pasd", cache=cache)
    second = load_checkpoint(golden_dir / "tiny_pasd", cache=cache)
    assert (cache.stats.conversions, cache.stats.hits) == (2, 2)  # unet + controlnet, once each
    assert all(_same(first[s][1], second[s][1]) and first[s][0] == second[s][0] for s in first)
    ldm = golden_dir / "ldm_single_file"
    a = load_sd_base(ldm / "model.safetensors", base=ldm, cache=cache)
    b = load_sd_base(ldm / "model.safetensors", base=ldm, cache=cache)
    print("after checkpoint x2 and single file x2:", cache.stats)
    assert (cache.stats.conversions, cache.stats.hits) == (3, 5)  # one read of the file serves 3 components
    assert all(_same(getattr(a, c)[1], getattr(b, c)[1]) for c in ("unet", "vae", "text_encoder"))


def _flip_last_data_byte(path: pathlib.Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "foreign entry", "empty"])
def test_bad_entry_is_rebuilt_not_trusted(tiny_unet, golden_dir, tmp_path, damage):
    cache = ConversionCache(tmp_path / "cache")
    _, ref = load_model_folder(tiny_unet, cache=cache)
    ref = jax.tree_util.tree_map(np.array, ref)  # owned: the loaded leaves are views of the entry damaged below
    (entry,) = _entries(cache)
    if damage == "flipped byte":
        _flip_last_data_byte(entry)
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:-100])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # a valid entry of another source copied over this one
        other = ConversionCache(tmp_path / "other")
        load_model_folder(golden_dir / "tiny_pasd" / "controlnet", cache=other)
        entry.write_bytes(_entries(other)[0].read_bytes())
    _, again = load_model_folder(tiny_unet, cache=cache)
    print(f"{damage}: {cache.stats}")
    assert (cache.stats.conversions, cache.stats.rebuilt, cache.stats.hits) == (2, 1, 0)
    assert _same(ref, again)
    load_model_folder(tiny_unet, cache=cache)  # the rebuilt entry is good
    assert (cache.stats.conversions, cache.stats.hits) == (2, 1)


def test_changed_source_converts_again_and_replaces_the_old_entry(tiny_unet, tmp_path):
    cache = ConversionCache(tmp_path / "cache")
    load_model_folder(tiny_unet, cache=cache)
    old = _entries(cache)
    weights = tiny_unet / "diffusion_pytorch_model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_model_folder(tiny_unet, cache=cache)
    assert cache.stats.conversions == 2
    new = _entries(cache)
    assert len(new) == 1 and new != old


def test_checksum_catches_edits(tmp_path):
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": {"bias": np.ones(3, np.float32)}}
    path = save_flax_params(tmp_path / "x.safetensors", tree, {"kind": "unet"})
    got, meta, _ = load_flax_params(path)
    assert meta == {"kind": "unet"} and _same(got, tree)
    _flip_last_data_byte(path)
    with pytest.raises(CacheEntryError, match="checksum"):
        load_flax_params(path)


def test_failed_write_leaves_no_entry_and_still_loads(tiny_unet, tmp_path, monkeypatch):
    from pasd_jax.convert import io

    cache = ConversionCache(tmp_path / "cache")

    def broken(f, arrays):  # the tensor data stops half-way
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "_write_tensors", broken)
    _, params = load_model_folder(tiny_unet, cache=cache)
    assert _entries(cache) == [] and list(cache.root.iterdir()) == []
    assert len(flatten_dict(params)) == 480


def test_location_and_off_switch(tiny_unet, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pasd_jax"
    monkeypatch.setenv(ENV, str(tmp_path / "elsewhere"))
    assert resolve_cache().root == tmp_path / "elsewhere"
    load_model_folder(tiny_unet)
    assert len(list((tmp_path / "elsewhere").glob("*.safetensors"))) == 1
    for off in ("off", "0", "false"):
        monkeypatch.setenv(ENV, off)
        assert resolve_cache() is None
    monkeypatch.setenv(ENV, "off")
    load_model_folder(tiny_unet)
    assert not (tmp_path / "home").exists() and len(list((tmp_path / "elsewhere").iterdir())) == 1
    assert resolve_cache(False) is None and resolve_cache(tmp_path / "c").root == tmp_path / "c"
