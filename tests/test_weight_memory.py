"""Weights held once: mapped safetensors reads, streamed aligned writes, device placement that aliases the host
buffer on CPU, and stage lines for long conversions."""
from __future__ import annotations

import logging

import jax
import ml_dtypes
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from pasd_jax.convert import io, progress
from pasd_jax.convert.base import load_model_folder, to_device
from pasd_jax.convert.cache import ConversionCache, load_flax_params


def test_streamed_file_reads_back_everywhere(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"conv": rng.standard_normal((8, 4, 3, 3), dtype=np.float32).transpose(2, 3, 1, 0),  # not contiguous
               "bias": rng.standard_normal(3).astype(np.float16), "ids": np.arange(7, dtype=np.int64),
               "empty": np.zeros((0, 5), np.float32), "bf": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)}
    path = io.write_safetensors(tensors, tmp_path / "w.safetensors", {"format": "pt"})
    theirs = load_file(str(path))  # the reference reader accepts the padded header and the ordering
    mapped = io.map_safetensors(path, release=True)
    assert mapped.metadata == {"format": "pt"} and set(mapped) == set(tensors)
    for k, v in tensors.items():
        want = np.asarray(v, np.float32) if k == "bf" else v
        assert np.array_equal(mapped[k], want), k
        if k != "bf":
            assert np.array_equal(theirs[k], v), k
    view = mapped["conv"]
    assert not view.flags.writeable and view.ctypes.data % io.ALIGN == 0  # 64-multiple tensors come first


def test_truncated_file_is_refused(tmp_path):
    path = io.write_safetensors({"w": np.ones((64, 64), np.float32)}, tmp_path / "w.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(io.WeightFileError, match="truncated"):
        io.map_safetensors(path)


def test_cpu_placement_aliases_the_mapped_cache_entry(golden_dir, tmp_path):
    if jax.default_backend() != "cpu":
        pytest.skip("aliasing host buffers is a CPU-backend property")
    cache = ConversionCache(tmp_path / "cache")
    load_model_folder(golden_dir / "tiny_pasd" / "unet", cache=cache)  # converts and writes the entry
    (entry,) = cache.root.glob("*.safetensors")
    host, _, _ = load_flax_params(entry)
    placed = to_device(host, np.float32)
    placed = flatten_dict(placed)
    pairs = [(h, placed[k]) for k, h in flatten_dict(host).items()]
    aliased = sum(h.ctypes.data == d.unsafe_buffer_pointer() for h, d in pairs)
    big = sum(h.nbytes for h, _ in pairs)
    shared = sum(h.nbytes for h, d in pairs if h.ctypes.data == d.unsafe_buffer_pointer())
    print(f"\n{aliased}/{len(pairs)} leaves aliased, {shared / big:.1%} of the bytes")
    # only tensors whose size is not a multiple of 64 bytes are copied (the tiny model's 40-channel biases and norms:
    # 162 of 480 leaves, 0.7 % of the bytes; at SD1.5 size every channel count is a multiple of 16)
    assert shared / big > 0.99
    assert all(np.array_equal(np.asarray(d), h) for h, d in pairs)


def test_conversion_prints_stages(golden_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(progress, "QUIET_BYTES", 0)
    cache = ConversionCache(tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="pasd_jax"):
        load_model_folder(golden_dir / "tiny_pasd" / "unet", cache=cache)
        load_model_folder(golden_dir / "tiny_pasd" / "unet", cache=cache)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("pasd_jax.convert")]
    print("\n" + "\n".join(lines))
    starts = [line for line in lines if "about" in line]
    assert [s.split(": ", 1)[1].split(" (")[0] for s in starts] == [
        "converting diffusion_pytorch_model.safetensors to the Flax layout",
        "writing the converted weights " + next(cache.root.glob("*.safetensors")).name,
        "reading and checking the converted weights"]
    assert sum("done in" in line for line in lines) == 3


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * io.mmap.PAGESIZE


def _mapped_tree(tmp_path, mb: int) -> dict:
    n = mb * 2 ** 20 // 4 // 8
    rng = np.random.default_rng(0)
    tensors = {f"w{i}": rng.standard_normal((n // 256, 256), dtype=np.float32) for i in range(8)}
    path = io.write_safetensors(tensors, tmp_path / "big.safetensors")
    del tensors
    return dict(io.map_safetensors(path))


def test_released_views_leave_resident_memory_and_stay_valid(tmp_path):
    views = _mapped_tree(tmp_path, 128)
    sums = {k: float(v.sum()) for k, v in views.items()}  # every page touched, as the cache checksum does
    before = _resident_bytes()
    assert all(io.release_pages(v) for v in views.values())
    after = _resident_bytes()
    print(f"\nresident {before / 2**20:.0f} MB -> {after / 2**20:.0f} MB after releasing 128 MB of mapped views")
    assert before - after > 100 * 2 ** 20
    assert {k: float(v.sum()) for k, v in views.items()} == sums  # read again from the page cache
    assert not io.release_pages(np.ones(4)) and not io.release_pages(jax.numpy.ones(4))


def test_host_params_placed_leaf_by_leaf_in_the_compute_dtype(tmp_path):
    """PASDPipeline.place: the peak is the placed bf16 tree plus one leaf, not fp32 host + device + cast copies."""
    import jax.numpy as jnp

    from pasd_jax import sharding

    views = _mapped_tree(tmp_path, 128)
    want = {k: np.asarray(jnp.asarray(v).astype(jnp.bfloat16)) for k, v in views.items()}  # XLA's cast
    for v in views.values():
        io.release_pages(v)
    before = _resident_bytes()
    placed = to_device(views, jnp.bfloat16, sharding.replicated(sharding.make_mesh()))  # PASDPipeline.place's path
    grown = _resident_bytes() - before
    print(f"\nplacing 128 MB of fp32 views as bf16 grew the resident memory by {grown / 2**20:.0f} MB")
    assert grown < 64 * 2 ** 20 + 24 * 2 ** 20  # the 64 MB bf16 tree + one 16 MB source leaf in flight + slack
    assert all(placed[k].dtype == jnp.bfloat16 and np.array_equal(np.asarray(placed[k]), want[k]) for k in want)


def test_cast_while_loading_releases_each_mapped_source_leaf(tmp_path):
    """convert.base.to_device in another dtype (load_for_sampling(param_dtype=bf16)): one leaf copied at a time,
    its mapped source dropped, so the peak is the cast tree, not the fp32 file beside it."""
    import jax.numpy as jnp

    views = _mapped_tree(tmp_path, 128)
    want = {k: np.asarray(jnp.asarray(v).astype(jnp.bfloat16)) for k, v in views.items()}
    for v in views.values():
        io.release_pages(v)
    before = _resident_bytes()
    placed = to_device(views, jnp.bfloat16)
    grown = _resident_bytes() - before
    print(f"\ncasting 128 MB of fp32 views to bf16 while loading grew the resident memory by {grown / 2**20:.0f} MB")
    assert grown < 64 * 2 ** 20 + 24 * 2 ** 20  # the 64 MB bf16 tree + one 16 MB source leaf + slack
    assert all(np.array_equal(np.asarray(placed[k]), want[k]) for k in want)


def test_a_fresh_conversion_is_returned_as_views_of_its_cache_entry(tmp_path):
    """The converted in-memory tree is freed once written: the caller gets views of the entry (checked)."""
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights")
    cache = ConversionCache(tmp_path / "cache")
    tree = {"block": {"kernel": np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "bias": np.ones(3, np.float32)}}
    params, meta = cache.load_or_convert([source], {"op": "test"}, lambda: (tree, {"kind": "test"}))
    assert cache.stats.conversions == 1 and meta == {"kind": "test"}
    leaves = flatten_dict(params)
    assert all(io._mapping_of(x) is not None for x in leaves.values())
    assert all(np.array_equal(leaves[k], v) for k, v in flatten_dict(tree).items())
