"""The web UI's engine: the same image as `pasd-sample` for the same file and settings, the progress callback does
not change it, and every failure a user can cause is a one-line message after which the session keeps working."""
from __future__ import annotations

import shlex
import shutil

import numpy as np
import pytest
from PIL import Image

from pasd_jax.app import presets, views
from pasd_jax.app.presets import Settings
from pasd_jax.app.service import AppError, Session
from pasd_jax.sampling import tasks
from pasd_jax.sampling.loading import Loaded
from pasd_jax.sampling.runner import image_key


@pytest.mark.slow
def test_ui_request_equals_pasd_sample_and_progress_changes_nothing(golden_dir, shared_dir, tmp_path):
    """One request through the Session (with the step callback the page uses) against `pasd-sample` run with the
    flags the page prints for it (no callback): bit-identical PNGs."""
    from pasd_jax.sampling import cli as sample_cli

    src = tmp_path / "in" / "bird.png"
    src.parent.mkdir()
    shutil.copy(shared_dir / "examples" / "Set5" / "bird.png", src)
    session = Session.load(str(golden_dir / "tiny_pasd"), base=str(golden_dir / "tiny_pipeline"), cache=False,
                           output_dir=tmp_path / "app")
    settings = Settings(upscale=2, process_size=64, steps=2, seed=1234, guidance_scale=7.5, conditioning_scale=1.1,
                        added_noise_level=500, prompt="a bird", dtype="float32")
    steps: list[tuple[int, int]] = []
    result = session.run(src, settings, on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 2), (2, 2)]
    assert result.image.shape == (144, 144, 3) and result.before.shape == result.image.shape
    assert result.prompt == "a bird, clean, high-resolution, 8k" and result.seed == 1234 and result.compiled
    np.testing.assert_array_equal(np.asarray(Image.open(result.png)), result.image)

    args = shlex.split(settings.sample_command(result.name))[1:]
    args[args.index("--input") + 1] = str(src)
    code = sample_cli.main(args + ["--ckpt", str(golden_dir / "tiny_pasd"), "--base", str(golden_dir / "tiny_pipeline"),
                                   "--output", str(tmp_path / "cli"), "--no-cache", "--no-progress"])
    assert code == 0
    cli = np.asarray(Image.open(tmp_path / "cli" / "bird.png"))
    diff = np.abs(cli.astype(int) - result.image.astype(int))
    print(f"web UI (with progress callback) vs pasd-sample (without): max |diff| {diff.max()} levels")
    assert diff.max() == 0  # same preprocessing, prompt, key and numbers: the callback program is the same maths

    again = session.run(src, settings, on_step=lambda done, total: None)  # as the page calls it: program reused
    assert not again.compiled and again.seconds < result.seconds
    np.testing.assert_array_equal(again.image, result.image)


class FakePipeline:
    """Records what the session asks the sampler for and returns its input (no model, no compile)."""

    def __init__(self, fail: Exception | None = None):
        self.fail, self.calls, self.trace_count, self.released = fail, [], 0, 0

    def release(self):
        self.released += 1

    def sample(self, images, prompts, negative_prompts, keys, options, *, on_step=None):
        self.calls.append((images, prompts, negative_prompts, np.asarray(keys), options))
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        for i in range(options.steps):
            if on_step is not None:
                on_step(i + 1, options.steps)
        return images


def _session(tmp_path, **kw) -> tuple[Session, FakePipeline]:
    pipe = FakePipeline(kw.pop("fail", None))
    loaded = Loaded(None, {}, tmp_path, tmp_path, "pasd")
    return Session(loaded, pipeline=pipe, output_dir=tmp_path / "out", **kw), pipe


def _image(path, w=40, h=32):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_request_path_matches_the_runner(tmp_path):
    session, pipe = _session(tmp_path)
    path = _image(tmp_path / "photo.png")
    result = session.run(path, Settings(upscale=2, process_size=64, steps=3, seed=9, negative_prompt="bad"))
    images, prompts, negatives, keys, options = pipe.calls[0]
    assert images.shape == (1, 64, 80, 3)  # 80x64 (x2) has a short side >= 64: no further resize
    assert prompts == ["clean, high-resolution, 8k"] and negatives == ["bad"] and options.steps == 3
    np.testing.assert_array_equal(keys[0], np.asarray(image_key(9, "photo.png")))  # as pasd-sample keys photo.png
    assert result.image.shape == (64, 80, 3) and result.name == "photo.png"
    assert result.png.name == "photo_pasd_sr_x2_seed9.png"


@pytest.mark.parametrize("kind,message", [
    ("text", "notes.txt: not an image file"),
    ("truncated", "notes.txt: unreadable or truncated image"),
])
def test_bad_files_give_a_message_naming_the_upload(tmp_path, kind, message):
    session, _ = _session(tmp_path)
    bad = tmp_path / "upload-dir-123" / "notes.txt"
    bad.parent.mkdir()
    if kind == "text":
        bad.write_bytes(b"just some text\n")
    else:
        png = _image(tmp_path / "whole.png", 64, 64).read_bytes()
        bad.write_bytes(png[: len(png) // 2])
    with pytest.raises(AppError, match=message) as err:
        session.run(bad, Settings())
    assert "upload-dir-123" not in str(err.value)  # the server's temp path is not the user's business
    assert session.run(_image(tmp_path / "ok.png"), Settings(process_size=64)).image.shape == (32, 40, 3)


def test_too_large_and_out_of_memory_are_messages_and_the_session_goes_on(tmp_path):
    session, _ = _session(tmp_path, max_megapixels=0.01, fail=RuntimeError("RESOURCE_EXHAUSTED: Out of memory "
                                                                           "while trying to allocate 9 GiB"))
    path = _image(tmp_path / "photo.png")
    with pytest.raises(AppError, match="over this server's limit of 0.01 megapixels"):
        session.run(path, Settings(upscale=4, process_size=64))
    with pytest.raises(AppError, match="too large for this device's memory at 80x64"):
        session.run(path, Settings(process_size=64))
    assert session.run(path, Settings(process_size=64)).image.shape == (32, 40, 3)


def test_other_sampler_errors_are_not_disguised(tmp_path):
    session, _ = _session(tmp_path, fail=TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):
        session.run(_image(tmp_path / "photo.png"), Settings(process_size=64))
    assert session.run(_image(tmp_path / "photo.png"), Settings(process_size=64)).seed == 0


def test_colorize_uses_its_own_scheduler_pipeline_and_prompt_rules(tmp_path):
    made = []

    def make(scheduler):
        made.append((scheduler, FakePipeline()))
        return made[-1][1]

    session, sr_pipe = _session(tmp_path, colorize_scheduler=tmp_path / "scheduler", make_pipeline=make)
    path = _image(tmp_path / "old.png", 64, 48)
    settings = Settings(task="colorize", upscale=3, process_size=64, prompt="a black and white photo",
                        added_prompt=tasks.default_added_prompt("colorize"),
                        negative_prompt=tasks.default_negative_prompt("colorize"))
    result = session.run(path, settings)
    assert [m[0] for m in made] == [tmp_path / "scheduler"] and not sr_pipe.calls
    images, prompts, negatives, _, _ = made[0][1].calls[0]
    assert images.shape == (1, 64, 80, 3)  # gray input, short side to 64, upscale ignored
    assert np.ptp(images[0].astype(int), axis=-1).max() == 0  # the sampler sees a gray image
    assert prompts == ["a color photo, "] and negatives == ["b&w, color bleeding"]
    assert result.image.shape == (48, 64, 3)  # the input's size
    assert session.run(path, Settings(process_size=64)).image.shape == (48, 64, 3) and sr_pipe.calls
    assert sr_pipe.released == 1 and made[0][1].released == 1  # one copy of the weights on the device at a time
    with_added = session.run(path, settings.replace(added_prompt="vivid", added_prompt_separator=True))
    assert with_added.prompt == "a color photo, vivid" and sr_pipe.released == 2


def test_colorize_needs_a_colorization_checkpoint(tmp_path):
    session, _ = _session(tmp_path)
    with pytest.raises(AppError, match="start the app with a colorization checkpoint"):
        session.run(_image(tmp_path / "old.png"), Settings(task="colorize", process_size=64))
    tiny, pipe = _session(tmp_path, tiny=True)  # the random models colorize with the base scheduler
    assert tiny.run(_image(tmp_path / "old.png"), Settings(task="colorize", process_size=64)).name == "old.png"
    assert len(pipe.calls) == 1


def test_classification_needs_its_weights(tmp_path):
    session, _ = _session(tmp_path)
    assert session.prompt_sources == ("none",)
    with pytest.raises(AppError, match="--classifier-weights"):
        session.run(_image(tmp_path / "photo.png"), Settings(high_level_info="classification"))


@pytest.mark.parametrize("change,message", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(upscale=9), "upscale must be 1 to 8"),
    (dict(latent_tile_overlap=400), "latent_tile_overlap"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(task="deblur"), "--task must be one of"),
])
def test_settings_refuse_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        Settings(**change)


def test_printed_command_parses_to_the_same_settings():
    from pasd_jax.sampling import cli as sample_cli

    s = presets.OFFICIAL_DEMO.replace(seed=77, prompt="it's a cat", high_level_info="none")
    a = sample_cli.parse_args(shlex.split(s.sample_command("cat.png"))[1:] + ["--ckpt", "x", "--output", "o"])
    assert (a.input, a.seed, a.upscale, a.process_size, a.prompt, a.added_prompt, a.negative_prompt) == (
        "cat.png", 77, 2, s.process_size, "it's a cat", s.added_prompt, s.negative_prompt)
    assert a.init_noise and a.added_prompt_separator and a.latent_tile_size == 256
    assert (a.guidance_scale, a.conditioning_scale, a.steps, a.dtype) == (7.5, 1.1, 20, s.dtype)


def test_official_demo_preset_is_the_documented_one():
    s = presets.OFFICIAL_DEMO
    assert (s.guidance_scale, s.conditioning_scale, s.latent_tile_size, s.init_noise, s.upscale) == (7.5, 1.1, 256,
                                                                                                      True, 2)
    assert s.high_level_info == "classification" and s.added_prompt_separator
    assert presets.SAMPLE_DEFAULTS.options() == Settings().options()


def test_widgets_round_trip_and_page_text_is_escaped(tmp_path):
    from pasd_jax.app import ui

    s = presets.OFFICIAL_DEMO.replace(seed=5)
    assert ui.settings_from(ui.widget_values(s), 5) == s
    assert ui.resolve_seed(12.0, False) == 12 and 0 <= ui.resolve_seed(3, True) < 2 ** 31
    with pytest.raises(AppError, match="seed must be >= 0"):
        ui.resolve_seed(-3, False)
    session, _ = _session(tmp_path)
    result = session.run(_image(tmp_path / "a<b>.png"), Settings(process_size=64, prompt="<script>x</script>"))
    page = views.info(result, "cmd")
    assert "<script>" not in page and "&lt;script&gt;" in page and "a&lt;b&gt;.png" in page
    assert "id='pasd-used-seed'>0<" in page


def test_cli_binds_to_loopback_and_limits_uploads():
    from pasd_jax.app import cli

    kw = cli.launch_kwargs(cli.parse_args([]))
    assert kw["server_name"] == "127.0.0.1" and kw["max_file_size"] == "25mb" and kw["share"] is False
    kw = cli.launch_kwargs(cli.parse_args(["--host", "0.0.0.0", "--port", "9000", "--max-upload-mb", "3"]))
    assert (kw["server_name"], kw["server_port"], kw["max_file_size"]) == ("0.0.0.0", 9000, "3mb")
    with pytest.raises(AppError, match="give --ckpt too"):
        Session.load(None, base="somewhere")


def test_page_queues_runs_one_at_a_time(tmp_path):
    pytest.importorskip("gradio", reason="the page needs the ui extra: pip install -e \".[ui]\"")
    from pasd_jax.app import ui

    session, _ = _session(tmp_path)
    demo = ui.build(session)
    runs = [fn for fn in demo.fns.values() if fn.name == "run"]
    assert len(runs) == 1 and runs[0].queue and runs[0].concurrency_limit == 1
    assert runs[0].concurrency_id == "device"
    assert all(not fn.queue for fn in demo.fns.values() if fn.name == "preview")  # instant, never behind a job


def test_memory_plan_refuses_before_sampling_and_the_session_goes_on(tmp_path, monkeypatch):
    """With real models the page asks the memory plan first, as pasd-sample does: a request that cannot fit is a
    message naming the size, the estimate and the flags, nothing is compiled, and the next request works."""
    from pasd_jax.sampling import memory

    session = Session.load(None, output_dir=tmp_path / "out")  # the embedded tiny models
    path = _image(tmp_path / "photo.png")
    monkeypatch.setenv(memory.ENV, "1M")
    with pytest.raises(AppError, match="needs about .* more than the 1 MB budget"):
        session.run(path, Settings(process_size=64, steps=1, dtype="float32"))
    assert session.pipeline(tasks.SR).trace_count == 0
    monkeypatch.setenv(memory.ENV, "64G")
    assert session.run(path, Settings(process_size=64, steps=1, dtype="float32")).image.shape == (32, 40, 3)
