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
