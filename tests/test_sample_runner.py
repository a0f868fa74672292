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
        RunSettings(batch_size=-1)
    with pytest.raises(ValueError, match="--color-fix"):
        RunSettings(color_fix="hist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(EchoSampler(), None, tmp_path / "nope", tmp_path / "out", _settings(), _prompt, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        run(EchoSampler(), None, tmp_path / "empty", tmp_path / "out", _settings(), _prompt, progress=False)


# --- concurrent runs, output checks, overlap, process shares ---------------------------------------------------

def _folder(root, n, size=(20, 12)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _img(root / f"img{i:02d}.png", size=size, seed=i)
    return root


def test_report_mentions_skips_only_when_there_are_some(tmp_path):
    src = _folder(tmp_path / "in", 1)
    summary = run(EchoSampler(), None, src, tmp_path / "out", _settings(), _prompt, progress=False)
    assert summary.report().startswith("1 written, 0 failed") and "skipped" not in summary.report()
    again = run(EchoSampler(), None, src, tmp_path / "out", _settings(), _prompt, progress=False)
    assert again.report().startswith("0 written, 1 skipped (output exists; --overwrite to redo), 0 failed")


def test_output_written_meanwhile_is_kept_and_reported(tmp_path):
    """Another run writes an image after this one planned it: its file is kept, this run says so."""
    src = _folder(tmp_path / "in", 2)
    out = tmp_path / "out"

    class Racer(EchoSampler):
        def sample(self, images, *a, **kw):
            (out / "img00.png").write_bytes(b"the other run's image")  # lands while this batch is on the device
            return super().sample(images, *a, **kw)

    summary = run(Racer(), None, src, out, _settings(batch_size=2), _prompt, progress=False)
    print("\n" + summary.report())
    assert summary.appeared == ["img00.png"] and summary.written == ["img01.png"]
    assert "1 skipped (output appeared meanwhile" in summary.report() and "output exists" not in summary.report()
    assert (out / "img00.png").read_bytes() == b"the other run's image"


def test_two_runs_into_one_folder_share_the_work(tmp_path):
    """Two runs at once into one folder: every image is written exactly once, by one of them, and equals what a
    single run writes."""
    import threading
    import time

    src = _folder(tmp_path / "in", 8)
    ref = run(EchoSampler(), None, src, tmp_path / "ref", _settings(), _prompt, progress=False)

    class Slow(EchoSampler):
        def sample(self, *a, **kw):
            time.sleep(0.03)
            return super().sample(*a, **kw)

    out, results = tmp_path / "out", [None, None]

    def worker(i):
        results[i] = run(Slow(), None, src, out, _settings(io_threads=2), _prompt, progress=False)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = results
    print(f"\nrun A: {a.report()}\nrun B: {b.report()}")
    assert sorted(a.written + b.written) == sorted(ref.written) and not set(a.written) & set(b.written)
    assert sorted(a.written + a.appeared + a.existing) == sorted(ref.written)
    for rel in ref.written:
        np.testing.assert_array_equal(np.asarray(Image.open(out / rel)), np.asarray(Image.open(tmp_path / "ref" / rel)))
    assert sorted(p.name for p in out.iterdir()) == sorted(ref.written)  # no temporary file left behind


WRITER = """
import sys, numpy as np, pathlib
from pasd_jax.image_io import write_image
out, seed = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(seed)
for i in range(40):
    write_image(out / f"x{i % 3}.png", rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
"""


def test_two_writers_never_show_a_partial_png(tmp_path):
    """Two processes rewriting the same three names while this one reads them: every read is a whole PNG. (With
    the former shared temporary name `.{name}.tmp` the same loop gave 108 truncated reads out of 417.)"""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(s)]) for s in (1, 2)]
    reads = 0
    while any(p.poll() is None for p in procs):
        for f in out.glob("x*.png"):
            with Image.open(f) as img:
                img.load()  # raises on a truncated file
            reads += 1
    assert all(p.wait() == 0 for p in procs)
    print(f"\n{reads} complete reads while two writers ran")
    assert sorted(p.name for p in out.iterdir()) == ["x0.png", "x1.png", "x2.png"]


def test_overlap_gives_the_same_files(tmp_path):
    src = _folder(tmp_path / "in", 5)
    _img(src / "big.png", size=(40, 40))
    a = run(EchoSampler(), None, src, tmp_path / "a", _settings(io_threads=0, batch_size=2), _prompt, progress=False)
    b = run(EchoSampler(), None, src, tmp_path / "b", _settings(io_threads=3, batch_size=2), _prompt, progress=False)
    assert sorted(a.written) == sorted(b.written) and len(a.written) == 6
    for rel in a.written:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_progress_passes_the_step_callback(tmp_path):
    class Stepping(EchoSampler):
        def sample(self, images, prompts, negative_prompts, keys, options, pad_to=None, on_step=None):
            self.on_step = on_step
            for i in range(3 if on_step else 0):
                on_step(i + 1, 3)
            return super().sample(images, prompts, negative_prompts, keys, options, pad_to)

    with_bar, without = Stepping(), Stepping()
    run(with_bar, None, _folder(tmp_path / "in", 1), tmp_path / "out", _settings(), _prompt, progress=True)
    run(without, None, tmp_path / "in", tmp_path / "out2", _settings(), _prompt, progress=False)
    assert callable(with_bar.on_step) and without.on_step is None  # no bar: no per-step host callbacks


def test_output_checks(tmp_path):
    from pasd_jax.errors import OutputPathError

    src = _folder(tmp_path / "in", 2)
    (tmp_path / "file").write_text("x")
    for output, message in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "cannot be written"),
                            (src, "is the --input folder")):
        with pytest.raises(OutputPathError, match=message):
            run(EchoSampler(), None, src, output, _settings(), _prompt, progress=False)
    # a single PNG input whose result would land on itself
    with pytest.raises(OutputPathError, match="written over the input"):
        run(EchoSampler(), None, src / "img00.png", src, _settings(overwrite=True), _prompt, progress=False)
    # input inside the output folder, with a sub-folder named like it: lr/lr/a.png -> out/lr/a.png, an input
    out = tmp_path / "out"
    _img((out / "lr" / "lr").mkdir(parents=True) or out / "lr" / "lr" / "a.png")
    _img(out / "lr" / "a.png")
    with pytest.raises(OutputPathError, match="written over the input"):
        run(EchoSampler(), None, out / "lr", out, _settings(), _prompt, progress=False)


def test_output_inside_input_is_not_read_as_input(tmp_path):
    src = _folder(tmp_path / "in", 2)
    first = run(EchoSampler(), None, src, src / "results", _settings(), _prompt, progress=False)
    again = run(EchoSampler(), None, src, src / "results", _settings(overwrite=True), _prompt, progress=False)
    assert sorted(first.written) == sorted(again.written) == ["img00.png", "img01.png"]
    assert not (src / "results" / "results").exists()


def test_process_shares_are_disjoint_and_cover_the_folder(tmp_path):
    from pasd_jax.sampling.plan import make_plan

    src = _folder(tmp_path / "in", 7)
    _img(src / "img03.jpg")  # collides with img03.png: the same file loses, whichever process has it
    shares = [make_plan(src, tmp_path / "out", _settings(), process=(i, 3)) for i in range(3)]
    rels = [it.rel for p in shares for g in p.groups.values() for it in g]
    failed = [rel for p in shares for rel, _ in p.summary.failed]
    assert sorted(rels) == sorted(f"img{i:02d}.{'jpg' if i == 3 else 'png'}" for i in range(7))
    assert len(set(rels)) == 7 and failed == ["img03.png"]  # the first in sorted order keeps the name
    assert [p.pending for p in shares] == [p.pending for p in
                                           (make_plan(src, tmp_path / "out", _settings(), process=(i, 3))
                                            for i in range(3))]


def test_auto_batch_is_one_image_per_device(tmp_path):
    from types import SimpleNamespace

    class TwoDevices(EchoSampler):
        mesh = SimpleNamespace(size=2)
        latent_factor = 8

    sampler = TwoDevices()
    options = SimpleNamespace(latent_tile_size=6)  # 48x32 -> 6x4 latent: not tiled; 80x80 -> 10x10: tiled
    src = _folder(tmp_path / "in", 3)
    _img(src / "big.png", size=(40, 40))
    _img(src / "big2.png", size=(40, 40))
    run(sampler, options, src, tmp_path / "out", _settings(batch_size=0), _prompt, progress=False)
    assert sorted(s[0] for s, _, _ in sampler.calls) == [1, 1, 1, 2]  # 3 small: 2 + 1; the two tiled ones: 1 each
