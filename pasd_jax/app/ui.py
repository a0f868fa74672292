"""The Gradio page: upload, settings, a before/after comparison, the full-resolution PNG and what was used.

`build(session)` returns the Blocks; `cli` launches it. Requests go through one queue with one job at a time on
the device (others see their position); every failure becomes a message in the page, never a dead server.
"""
from __future__ import annotations

import contextvars
import logging
import pathlib
import secrets
from typing import Any

from pasd_jax.app import views
from pasd_jax.app.presets import OFFICIAL_DEMO, Settings
from pasd_jax.app.service import AppError, Session
from pasd_jax.sampling import tasks
from pasd_jax.sampling.options import DTYPES
from pasd_jax.schedulers import SCHEDULER_KINDS

log = logging.getLogger(__name__)
PREVIEW_SIDE = 512
TASK_CHOICES = [("Super-resolution", tasks.SR), ("Colorization", tasks.COLORIZE)]
START_CHOICES = [("Added noise (ANS, paper)", "ans"), ("Pure noise (official demo)", "noise")]
# Settings fields in the order of the widgets that hold them (the handlers' positional inputs).
FIELDS = ("task", "upscale", "prompt", "added_prompt", "negative_prompt", "high_level_info", "added_prompt_separator",
          "steps", "scheduler", "guidance_scale", "conditioning_scale", "init_noise", "added_noise_level",
          "color_fix", "process_size", "latent_tile_size", "latent_tile_overlap", "dtype")
INTS = {"upscale", "steps", "added_noise_level", "process_size", "latent_tile_size", "latent_tile_overlap"}


def widget_values(s: Settings) -> list[Any]:
    """A Settings as the widgets show it (the start is a radio, not a bool)."""
    return [("noise" if s.init_noise else "ans") if f == "init_noise" else getattr(s, f) for f in FIELDS]


def settings_from(values: list[Any], seed: int) -> Settings:
    """Widget values -> Settings (raises ValueError with a one-line message)."""
    kw = dict(zip(FIELDS, values))
    kw["init_noise"] = kw["init_noise"] == "noise"
    for f in INTS:
        kw[f] = int(round(float(kw[f])))
    for f in ("guidance_scale", "conditioning_scale"):
        kw[f] = float(kw[f])
    return Settings(seed=seed, **kw)


def resolve_seed(seed: Any, random_seed: bool) -> int:
    if random_seed:
        return secrets.randbelow(2 ** 31)
    try:
        value = int(seed)
    except (TypeError, ValueError):
        raise AppError(f"seed must be a whole number >= 0, got {seed!r}") from None
    if value < 0:
        raise AppError(f"seed must be >= 0, got {value}")
    return value


def _file_path(upload: Any) -> pathlib.Path | None:
    if upload is None:
        return None
    return pathlib.Path(getattr(upload, "name", upload))


def preview(upload: Any) -> tuple[Any, str]:
    """The uploaded file as the sampler will read it (downscaled for display), or why it cannot be read."""
    path = _file_path(upload)
    if path is None:
        return None, views.status("Upload an image to start.")
    from pasd_jax.image_io import ImageReadError, read_image
    from pasd_jax.image_ops import pil_resize

    try:
        rgb = read_image(path).rgb
    except ImageReadError as e:
        return None, views.error(str(e).replace(str(path), path.name))
    h, w = rgb.shape[:2]
    scale = min(1.0, PREVIEW_SIDE / max(h, w))
    shown = rgb if scale == 1.0 else pil_resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))))
    return shown, views.status(f"{path.name}: {w}x{h}. Press Restore.")


def make_run(session: Session):
    import gradio as gr

    def run(upload, seed, random_seed, *values, progress=gr.Progress()):
        """-> status, comparison, download button, result info, seed box."""
        empty = (None, gr.update(visible=False, value=None), "")
        path = _file_path(upload)
        if path is None:
            return (views.error("Upload an image first."), *empty, seed)
        try:
            used_seed = resolve_seed(seed, random_seed)
            settings = settings_from(list(values), used_seed)
        except (AppError, ValueError) as e:
            return (views.error(str(e)), *empty, seed)
        ctx = contextvars.copy_context()  # JAX calls on_step from its own thread; the progress lives in this context

        def on_step(done: int, total: int) -> None:
            ctx.run(progress, (done, total), desc="Denoising", unit="steps")

        progress((0, settings.steps), desc="Preparing (the first run at a size compiles)", unit="steps")
        try:
            result = session.run(path, settings, on_step=on_step)
        except AppError as e:
            return (views.error(str(e)), *empty, used_seed)
        except Exception as e:  # noqa: BLE001 - the server keeps serving after any failure
            log.exception("request failed")
            return (views.error(f"internal error ({type(e).__name__}: {e}); the server log has the details"),
                    *empty, used_seed)
        download = gr.update(visible=True, value=str(result.png),
                             label=f"Download PNG ({result.image.shape[1]}x{result.image.shape[0]})")
        command = settings.sample_command(result.name)
        return (views.done(result), (result.before, result.image), download, views.info(result, command),
                used_seed)
    return run


def build(session: Session):
    import gradio as gr

    d = session.defaults
    with gr.Blocks(title="PASD web UI", analytics_enabled=False, delete_cache=(3600, 7200)) as demo:
        gr.HTML(views.header(session))
        notice = views.model_notice(session)
        if notice:
            gr.HTML(notice)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=360):
                upload = gr.File(label="Input image (PNG, JPEG, WebP, TIFF, BMP)", type="filepath",
                                 elem_id="pasd-input", height=110)
                shown = gr.Image(label="Input", interactive=False, height=220, format="png", elem_id="pasd-preview",
                                 buttons=[])
                task = gr.Radio(TASK_CHOICES, value=d.task, label="Task", info=_task_info(session))
                prompt = gr.Textbox(label="Prompt", value=d.prompt, elem_id="pasd-prompt",
                                    placeholder="optional: what the image shows")
                added = gr.Textbox(label="Added prompt", value=d.added_prompt)
                negative = gr.Textbox(label="Negative prompt", value=d.negative_prompt, lines=2)
                with gr.Row():
                    upscale = gr.Slider(1, 4, value=d.upscale, step=1, label="Upscale", scale=1,
                                        elem_id="pasd-upscale")
                    with gr.Column(scale=1, min_width=160):
                        seed = gr.Number(label="Seed", value=d.seed, precision=0, minimum=0, elem_id="pasd-seed")
                        random_seed = gr.Checkbox(label="New random seed every run", value=False)
                with gr.Row():
                    defaults_btn = gr.Button("pasd-sample defaults", size="sm")
                    demo_btn = gr.Button("Official demo settings", size="sm", elem_id="pasd-official")
                go = gr.Button("Restore", variant="primary", elem_id="pasd-run")
                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=d.steps, step=1, label="Steps", elem_id="pasd-steps")
                        scheduler = gr.Dropdown(list(SCHEDULER_KINDS), value=d.scheduler, label="Scheduler")
                    with gr.Row():
                        guidance = gr.Slider(1.0, 15.0, value=d.guidance_scale, step=0.1, label="Guidance scale (CFG)")
                        conditioning = gr.Slider(0.0, 2.0, value=d.conditioning_scale, step=0.05,
                                                 label="Conditioning scale")
                    start = gr.Radio(START_CHOICES, value="noise" if d.init_noise else "ans", label="Start from")
                    ans_level = gr.Slider(0, 999, value=d.added_noise_level, step=1, label="ANS added-noise level",
                                          info=views.ANS_INFO)
                    with gr.Row():
                        color_fix = gr.Dropdown(list(tasks.COLOR_FIXES), value=d.color_fix, label="Colour fix")
                        source = gr.Dropdown(list(session.prompt_sources), value=d.high_level_info,
                                             label="Prompt from", interactive=len(session.prompt_sources) > 1)
                    separator = gr.Checkbox(label="Join the added prompt with \", \" (the official demo does)",
                                            value=d.added_prompt_separator)
                with gr.Accordion("Memory and precision", open=False):
                    with gr.Row():
                        process_size = gr.Slider(64, 2048, value=d.process_size, step=8, label="Process size",
                                                 info="minimum short side the image is processed at")
                        dtype = gr.Dropdown(list(DTYPES), value=d.dtype, label="Precision",
                                            info="bfloat16 on accelerators; float32 on a CPU")
                    with gr.Row():
                        tile = gr.Slider(32, 512, value=d.latent_tile_size, step=8, label="Latent tile size",
                                         info="latent pixels; larger images are tiled")
                        overlap = gr.Slider(0, 64, value=d.latent_tile_overlap, step=1, label="Tile overlap")
            with gr.Column(scale=7, min_width=420):
                status = gr.HTML(views.status("Upload an image to start."), elem_id="pasd-status")
                compare = gr.ImageSlider(label="Before (input, bicubic) | after (PASD)", type="numpy", format="png",
                                         interactive=False, elem_id="pasd-compare", max_height=720)
                download = gr.DownloadButton("Download PNG", visible=False, variant="primary",
                                             elem_id="pasd-download")
                result_info = gr.HTML("", elem_id="pasd-info")
        with gr.Accordion("The official demo's settings, side by side", open=False, elem_classes="pasd-notes"):
            gr.Markdown(views.official_notes())

        widgets = [task, upscale, prompt, added, negative, source, separator, steps, scheduler, guidance,
                   conditioning, start, ans_level, color_fix, process_size, tile, overlap, dtype]
        upload.change(preview, upload, [shown, status], queue=False)
        go.click(make_run(session), [upload, seed, random_seed, *widgets],
                 [status, compare, download, result_info, seed], concurrency_limit=1, concurrency_id="device",
                 show_progress_on=[compare])
        defaults_btn.click(lambda: widget_values(d), None, widgets, queue=False)
        official = OFFICIAL_DEMO.replace(dtype=d.dtype, process_size=d.process_size,
                                         high_level_info="classification" if "classification" in
                                         session.prompt_sources else "none")
        demo_btn.click(lambda: widget_values(official), None, widgets, queue=False)
        task.input(_task_changed, task, [added, negative, upscale], queue=False)
    return demo


def _task_info(session: Session) -> str | None:
    if session.tiny:
        return None
    if session.colorize_scheduler is None:
        return "colorization needs a colorization checkpoint (pasd_light_color, with its scheduler/ beside it)"
    return "colorization samples with the scheduler beside the checkpoint, as pasd-sample --task colorize does"


def _task_changed(task: str):
    """The task's own prompt defaults (as `pasd-sample --task`); colorization keeps the input size."""
    import gradio as gr

    return (gr.update(value=tasks.default_added_prompt(task)), gr.update(value=tasks.default_negative_prompt(task)),
            gr.update(value=1, interactive=False) if task == tasks.COLORIZE else gr.update(interactive=True))
