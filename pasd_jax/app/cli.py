"""`pasd-app` / `python -m pasd_jax.app`: the PASD web UI (needs the `ui` extra: `pip install -e ".[ui]"`).

    pasd-app                                                    # embedded tiny random models, offline
    pasd-app --ckpt runs/pasd/checkpoint-100000 --base checkpoints/stable-diffusion-v1-5 --port 7860

The server binds to 127.0.0.1 unless --host says otherwise; --share asks Gradio for a public link (it needs the
internet, and anyone with the link can use your device). Nothing is sent anywhere else: Gradio's analytics and
version check are off.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

# Set before gradio is imported: no telemetry, no version check, no hub calls.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "GRADIO_SSR_MODE": "False"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pasd-app", description="PASD web UI (Gradio)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("weights (none given: the embedded tiny random models)")
    g.add_argument("--ckpt", default=None, help="PASD checkpoint: official folder, imported folder or train.py run")
    g.add_argument("--base", default=None, help="SD1.5 base (diffusers folder or single file)")
    g.add_argument("--personalized", default=None, help="personalized SD1.5 model replacing the UNet's base weights")
    g.add_argument("--blending-alpha", type=float, default=1.0)
    g.add_argument("--lora", default=None, help="LoRA file merged into the UNet and text encoder")
    g.add_argument("--lora-multiplier", type=float, default=0.6)
    g.add_argument("--classifier-weights", default=None,
                   help="torchvision ResNet-50 .safetensors: enables the classification prompt (official demo)")
    g.add_argument("--categories-file", default=None, help="ImageNet category names (JSON list)")
    g.add_argument("--cache-dir", default=None, help="converted-weights cache (default ~/.cache/pasd_jax)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves every network interface")
    g.add_argument("--port", type=int, default=7860)
    g.add_argument("--share", action="store_true", help="public Gradio link (needs the internet)")
    g.add_argument("--max-upload-mb", type=float, default=25.0, help="largest accepted upload")
    g.add_argument("--max-megapixels", type=float, default=16.0,
                   help="largest processed image (upscale included) a request may ask for")
    g.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more are turned away")
    args = p.parse_args(argv)
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0 or args.queue_size < 1:
        p.error("--max-upload-mb and --max-megapixels must be positive, --queue-size at least 1")
    return args


def launch_kwargs(args: argparse.Namespace) -> dict:
    """What `Blocks.launch` gets besides the theme."""
    return dict(server_name=args.host, server_port=args.port, share=args.share,
                max_file_size=f"{args.max_upload_mb:g}mb", show_error=False, ssr_mode=False, footer_links=[])


def serve(args: argparse.Namespace, *, block: bool = True):
    """Load the models once, build the page and launch it; returns the Blocks when `block` is False."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import gradio as gr
    except ImportError:
        from pasd_jax.errors import MissingDependencyError

        raise MissingDependencyError("the web UI needs Gradio: pip install -e \".[ui]\"") from None
    from pasd_jax.app import ui, views
    from pasd_jax.app.service import Session

    session = Session.load(args.ckpt, base=args.base, personalized=args.personalized, lora=args.lora,
                           lora_multiplier=args.lora_multiplier, blending_alpha=args.blending_alpha,
                           classifier_weights=args.classifier_weights, categories_file=args.categories_file,
                           cache=args.cache_dir, max_megapixels=args.max_megapixels)
    for note in session.loaded.notes:
        logging.info(note)
    demo = ui.build(session)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    theme = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")
    demo.launch(prevent_thread_lock=not block, theme=theme, css=views.CSS, **launch_kwargs(args))
    return demo


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("jax", "absl", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pasd_jax.errors import PasdError

    try:
        serve(args)
    except (PasdError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
