"""sample.py's folder handling with a stand-in sampler: inputs, outputs, seeds and every bad-input case."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import jax

from pasd_jax import image_io
from pasd_jax.sampling.runner import RunSettings, image_key, run


class EchoSampler:
    """Returns the processed LQ image shifted by a key-dependent offset, so outputs reveal the key used."""

    def __init__(self):
        self.calls = []

    def sample(self, images, prompts, negative_prompts, keys, options, pad_to=None):
        assert pad_to is None or pad_to >= len(images)
        self.calls.append((images.shape, list(prompts), list(negative_prompts)))
        offsets = [int(jax.random.randint(k, (), 0, 50)) for k in keys]
        return np.stack([np.clip(img.astype(np.int32) + o, 0, 255).astype(np.uint8)
                         for img, o in zip(images, offsets)])


def _img(path, size=(20, 12), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)).save(path)
        return path
    arr = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
    src = Image.fromarray(arr, "RGBA")
    (src if mode in ("RGBA", "LA") else src.convert("RGB")).convert(mode).save(path)
    return path


def _settings(**kw):
    base = dict(upscale=2, process_size=32, color_fix="none", negative_prompt="neg")
    base.update(kw)
    return RunSettings(**base)


def _prompt(img, rel):
    return f"prompt for {rel}"


def test_folder_recursive_same_relative_names(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    _img(src / "a.png")
    _img(src / "sub" / "b.jpg", size=(16, 16))
    sampler = EchoSampler()
    summary = run(sampler, None, src, tmp_path / "out", _settings(), _prompt, progress=False)
    assert summary.exit_code == 0 and sorted(summary.written) == ["a.png", "sub/b.jpg"]
    a = Image.open(tmp_path / "out" / "a.png")
    assert a.size == (40, 24)  # original size x upscale
    assert (tmp_path / "out" / "sub" / "b.png").is_file()
    prompts = [p for _, ps, _ in sampler.calls for p in ps]
    assert "prompt for sub/b.jpg" in prompts
    assert all(neg == ["neg"] * len(neg) for _, _, neg in sampler.calls)


def test_seed_depends_on_path_not_on_folder_order(tmp_path):
    for name, files in (("one", ["x.png"]), ("two", ["a.png", "b.png", "x.png"])):
        src = tmp_path / name
        src.mkdir()
        for i, f in enumerate(files):
            _img(src / f, seed=7 if f == "x.png" else i)
        run(EchoSampler(), None, src, tmp_path / f"out_{name}", _settings(), _prompt, progress=False)
    one = np.asarray(Image.open(tmp_path / "out_one" / "x.png"))
    two = np.asarray(Image.open(tmp_path / "out_two" / "x.png"))
    np.testing.assert_array_equal(one, two)
    assert not np.array_equal(image_key(0, "x.png"), image_key(1, "x.png"))
    assert not np.array_equal(image_key(0, "x.png"), image_key(0, "y.png"))


def test_bad_inputs_are_reported_and_the_rest_written(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _img(src / "good.png")
    (src / "notes.png").write_text("this is not an image")
    data = (_img(tmp_path / "full.png", size=(64, 64))).read_bytes()
    (src / "truncated.png").write_bytes(data[: len(data) // 2])
    _img(src / "tiny.png", size=(5, 30))
    summary = run(EchoSampler(), None, src, tmp_path / "out", _settings(), _prompt, progress=False)
    failed = dict(summary.failed)
    print("\n" + summary.report())
    assert summary.written == ["good.png"] and summary.exit_code == 1
    assert "not an image" in failed["notes.png"]
    assert "truncated" in failed["truncated.png"]
    assert "at least 8 pixels" in failed["tiny.png"]
    assert (tmp_path / "out" / "good.png").is_file()
    assert not (tmp_path / "out" / "notes.png").exists()


def test_existing_output_is_never_overwritten_without_flag(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _img(src / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"precious")
    summary = run(EchoSampler(), None, src, out, _settings(), _prompt, progress=False)
    assert summary.existing == ["a.png"] and (out / "a.png").read_bytes() == b"precious"
    summary = run(EchoSampler(), None, src, out, _settings(overwrite=True), _prompt, progress=False)
    assert summary.written == ["a.png"] and (out / "a.png").read_bytes() != b"precious"


def test_output_name_collision(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _img(src / "a.jpg")
    _img(src / "a.png")
    summary = run(EchoSampler(), None, src, tmp_path / "out", _settings(), _prompt, progress=False)
    assert len(summary.written) == 1 and "also the output of" in dict(summary.failed)["a.png"]


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_input_modes_become_rgb8(tmp_path, mode):
    path = _img(tmp_path / ("x.tif" if mode == "CMYK" else "x.png"), mode=mode)
    loaded = image_io.read_image(path)
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (12, 20, 3)
    assert (loaded.alpha is not None) == (mode in ("RGBA", "LA"))


def test_sixteen_bit_scaling(tmp_path):
    arr = np.array([[0, 257, 65535, 32896] * 4] * 8, np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    loaded = image_io.read_image(tmp_path / "g16.png")
    assert loaded.rgb[0, :4, 0].tolist() == [0, 1, 255, 128]


def test_keep_alpha(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _img(src / "a.png", mode="RGBA")
    run(EchoSampler(), None, src, tmp_path / "o1", _settings(), _prompt, progress=False)
    run(EchoSampler(), None, src, tmp_path / "o2", _settings(keep_alpha=True), _prompt, progress=False)
    assert Image.open(tmp_path / "o1" / "a.png").mode == "RGB"
    with_alpha = Image.open(tmp_path / "o2" / "a.png")
    assert with_alpha.mode == "RGBA" and with_alpha.size == (40, 24)


def test_batches_group_same_processed_size(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _img(src / f"s{i}.png", size=(20, 12), seed=i)
    _img(src / "big.png", size=(40, 40))
    sampler = EchoSampler()
    run(sampler, None, src, tmp_path / "out", _settings(batch_size=2), _prompt, progress=False)
    shapes = sorted(s for s, _, _ in sampler.calls)
    assert shapes == [(1, 32, 48, 3), (1, 80, 80, 3), (2, 32, 48, 3)]  # 20x12 x2 -> 53x32 -> 48x32


def test_a_failing_batch_does_not_stop_the_run(tmp_path):
    class Flaky(EchoSampler):
        def sample(self, images, *a, **kw):
            if images.shape[1] == 80:
                raise ValueError("device out of memory")
            return super().sample(images, *a, **kw)

    src = tmp_path / "in"
    src.mkdir()
    _img(src / "small.png")
    _img(src / "big.png", size=(40, 40))
    summary = run(Flaky(), None, src, tmp_path / "out", _settings(), _prompt, progress=False)
    assert summary.written == ["small.png"] and "out of memory" in dict(summary.failed)["big.png"]


def test_bad_settings_and_missing_input(tmp_path):
    with pytest.raises(ValueError, match="--batch-size"):
        RunSettings(batch_size=0)
    with pytest.raises(ValueError, match="--color-fix"):
        RunSettings(color_fix="hist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(EchoSampler(), None, tmp_path / "nope", tmp_path / "out", _settings(), _prompt, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        run(EchoSampler(), None, tmp_path / "empty", tmp_path / "out", _settings(), _prompt, progress=False)
