"""`pasd-sample` / `python sample.py`: super-resolve an image or a folder with PASD.

    pasd-sample --ckpt runs/pasd/checkpoint-100000 --base checkpoints/stable-diffusion-v1-5 \
        --input photos/ --output out/ --upscale 4
    pasd-sample --task colorize --ckpt runs/pasd_light_color/checkpoint-180000 \
        --base checkpoints/stable-diffusion-v1-5 --input old_photos/ --output colour/

Defaults follow the official `test_pasd.py` (UniPC, 20 steps, CFG 9, conditioning 1.0, ANS level 900, process size
768, wavelet colour fix) except where README.md "Differences from the official code" says otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys


DEFAULT_STEPS, LCM_STEPS = 20, 4


def resolve_steps(args: argparse.Namespace) -> tuple[int, str]:
    """Steps and scheduler: the official defaults (UniPC, 20), or LCM with 4 steps when an LCM-LoRA is fused
    (the official --use_lcm_lora keeps --num_inference_steps at 20 unless told; 4 is what LCM is for). Explicit
    --steps / --scheduler always win."""
    lcm = args.lcm_lora is not None
    scheduler = args.scheduler or ("lcm" if lcm else "unipc")
    steps = args.steps if args.steps is not None else (LCM_STEPS if scheduler == "lcm" else DEFAULT_STEPS)
    return steps, scheduler


def parse_args(argv=None) -> argparse.Namespace:
    from pasd_jax.prompts import DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT, HIGH_LEVEL_INFO
    from pasd_jax.sampling import tasks
    from pasd_jax.sampling import session
    from pasd_jax.sampling.options import DTYPE_CHOICES
    from pasd_jax.sampling.runner import COLOR_FIXES
    from pasd_jax.schedulers import SCHEDULER_KINDS

    p = argparse.ArgumentParser(prog="pasd-sample", description="PASD super-resolution (pasd-jax): an image or a "
                                "folder of images, with an official PASD checkpoint or one of our runs",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("weights")
    g.add_argument("--ckpt", required=True, help="PASD checkpoint: official folder (unet/ + controlnet/), "
                   "a `pasd-convert import` folder, a train.py work dir, or a Hugging Face name "
                   "org/name[:subfolder] (e.g. yangtao9009/PASD:pasd/checkpoint-100000)")
    g.add_argument("--ckpt-subfolder", default=None, help="folder inside --ckpt holding unet/ and controlnet/")
    g.add_argument("--base", default=None, help="SD1.5 base (diffusers folder or single file, or a Hugging Face "
                   "name such as stable-diffusion-v1-5/stable-diffusion-v1-5) for the VAE, text encoder, "
                   "tokenizer and scheduler; optional for train.py checkpoints")
    g.add_argument("--personalized", default=None, help="personalized SD1.5 model whose base weights replace "
                   "the PASD UNet's (single file, diffusers folder or UNet folder); PACA is kept")
    g.add_argument("--blending-alpha", type=float, default=1.0)
    g.add_argument("--lora", action="append", default=None, metavar="PATH[:WEIGHT]",
                   help="LoRA merged into the UNet and text encoder (kohya, diffusers, PEFT or LyCORIS file, or a "
                   "folder holding one); repeat for several, each with its own weight (default --lora-multiplier)")
    g.add_argument("--lora-multiplier", type=float, default=0.6, help="weight of a --lora given without one")
    g.add_argument("--lcm-lora", default=None, metavar="PATH",
                   help="few-step sampling as the official --use_lcm_lora: fuse this LCM-LoRA (e.g. "
                   "lcm-lora-sdv1-5) into the UNet and sample with the LCM scheduler (default 4 steps)")
    g.add_argument("--lora-rule", default="alpha_scaled", choices=["alpha_scaled", "official"],
                   help="official = PASD's merge, which ignores the LoRA alpha")
    g.add_argument("--scheduler-config", default=None, help="scheduler_config.json (or its folder) to use instead "
                   "of the base's (sr) or the scheduler/ folder beside --ckpt (colorize)")
    g.add_argument("--cache-dir", default=None, help="converted-weights cache (default ~/.cache/pasd_jax)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the conversion cache")

    g = p.add_argument_group("input and output")
    g.add_argument("--task", "--control-type", dest="task", default=tasks.SR,
                   choices=list(tasks.TASKS) + list(tasks.ALIASES),
                   help="sr: super-resolution; colorize (official --control_type grayscale): colour a gray photo "
                   "(pasd_light_color), scheduler from the scheduler/ folder beside --ckpt, upscale 1, no colour "
                   "fix, the input's luma kept")
    g.add_argument("--input", required=True, help="an image or a folder (searched recursively)")
    g.add_argument("--output", required=True, help="output folder; results keep the relative names, as .png")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    g.add_argument("--keep-alpha", action="store_true", help="carry an input's alpha channel to the output")
    g.add_argument("--upscale", type=int, default=1, help="integer pre-upscale; the output is input size x this")
    g.add_argument("--process-size", type=int, default=768, help="minimum short side for processing")
    g.add_argument("--color-fix", default="wavelet", choices=list(COLOR_FIXES))
    g.add_argument("--batch-size", type=int, default=0, help="images of the same processed size per call (0: one "
                   "per local device; 1 for sizes sampled with latent tiling)")
    g.add_argument("--no-progress", action="store_true")

    g = p.add_argument_group("sampling")
    g.add_argument("--seed", type=int, default=0, help="per-image seeds derive from this and the relative path")
    g.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {DEFAULT_STEPS}; "
                   f"{LCM_STEPS} with --lcm-lora)")
    g.add_argument("--scheduler", default=None, choices=list(SCHEDULER_KINDS),
                   help="default unipc (the official test_pasd.py); lcm with --lcm-lora")
    g.add_argument("--guidance-scale", type=float, default=9.0)
    g.add_argument("--conditioning-scale", type=float, default=1.0)
    g.add_argument("--added-noise-level", type=int, default=900, help="ANS level (paper Eq. 4)")
    g.add_argument("--ans-mode", default="paper", choices=["paper", "official"],
                   help="paper: the level indexes the training schedule; official: diffusers 0.29.2 add_noise")
    g.add_argument("--init-noise", action="store_true", help="start from pure noise (the official demo); no ANS")
    g.add_argument("--offset-noise-scale", type=float, default=0.0, help="with --init-noise")
    g.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help="compute precision; auto: bfloat16 on GPU/TPU, float32 on CPU (XLA's CPU bf16 is emulated: "
                        "slower, and it holds an fp32 copy of the weights besides)")
    g.add_argument("--latent-tile-size", type=int, default=320, help="latent tiling above this (latent px)")
    g.add_argument("--latent-tile-overlap", type=int, default=8)
    g.add_argument("--tiled-vae", default="auto", choices=["auto", "on", "off"])
    g.add_argument("--vae-encoder-tile", type=int, default=1024, help="pixels")
    g.add_argument("--vae-decoder-tile", type=int, default=224, help="latent pixels")

    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", default="")
    g.add_argument("--added-prompt", default=None,
                   help=f"appended to the prompt (default {DEFAULT_ADDED_PROMPT!r} for sr, none for colorize)")
    g.add_argument("--added-prompt-separator", action="store_true",
                   help="join the added prompt with ', ' (the official code glues it on without a separator)")
    g.add_argument("--negative-prompt", default=None, help=f"default {DEFAULT_NEGATIVE_PROMPT!r} for sr, "
                   f"{tasks.default_negative_prompt(tasks.COLORIZE)!r} for colorize")
    g.add_argument("--high-level-info", default="none", choices=list(HIGH_LEVEL_INFO),
                   help="prompt from a classifier, detector or captioner (the official default is caption)")
    g.add_argument("--captions", default=None, help="JSON or CSV mapping image paths to captions")
    g.add_argument("--classifier-weights", default=None, help="torchvision ResNet-50 weights (.safetensors)")
    g.add_argument("--categories-file", default=None, help="ImageNet category names (JSON list)")
    g.add_argument("--detector-weights", default=None, help="YOLO weights (needs ultralytics)")
    g.add_argument("--captioner", default=None, help="CoCa checkpoint or BLIP folder (needs torch)")
    g.add_argument("--caption-model", default="coca", choices=["coca", "blip"])
    g.add_argument("--prompt-cache", default=None, help="folder caching high-level information per image")
    session.add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("jax", "absl"):  # JAX backend probing, Orbax file-by-file INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pasd_jax.sampling.session import run_main
    return run_main(args, _main)


def _main(args: argparse.Namespace, sess) -> int:
    """Checks, plan, weights, sampling; `sess` (sampling.session) owns signals, processes and summary.json."""
    from pasd_jax.errors import PasdError
    from pasd_jax.prompts import MissingDependencyError, build_prompt_fn
    from pasd_jax.sampling.loading import load_for_sampling
    from pasd_jax.sampling.options import DTYPES, SamplingOptions, resolve_dtype
    from pasd_jax.sampling.pipeline import PASDPipeline
    from pasd_jax.sampling.runner import RunSettings
    from pasd_jax.convert.lora import parse_lora_arg
    from pasd_jax.sampling import tasks
    from pasd_jax.schedulers import scheduler_from_config

    try:  # everything that can be checked before loading gigabytes is checked first
        task = tasks.resolve(args.task)
        args.dtype = resolve_dtype(args.dtype)  # after the session started JAX (jax.distributed first)
        for note in tasks.notes(task, args.upscale):
            logging.info(note)
        if args.added_prompt is None:
            args.added_prompt = tasks.default_added_prompt(task)
        if args.negative_prompt is None:
            args.negative_prompt = tasks.default_negative_prompt(task)
        settings = RunSettings(upscale=args.upscale, process_size=args.process_size, color_fix=args.color_fix,
                               keep_alpha=args.keep_alpha, overwrite=args.overwrite, seed=args.seed,
                               batch_size=args.batch_size, negative_prompt=args.negative_prompt,
                               io_threads=args.io_threads, task=task)
        steps, scheduler = resolve_steps(args)
        options = SamplingOptions(
            steps=steps, scheduler=scheduler, guidance_scale=args.guidance_scale,
            conditioning_scale=args.conditioning_scale, added_noise_level=args.added_noise_level,
            ans_mode=args.ans_mode, init_noise=args.init_noise, offset_noise_scale=args.offset_noise_scale,
            latent_tile_size=args.latent_tile_size, latent_tile_overlap=args.latent_tile_overlap,
            tiled_vae=args.tiled_vae, vae_encoder_tile=args.vae_encoder_tile, vae_decoder_tile=args.vae_decoder_tile,
            dtype=args.dtype)
        plan = sess.plan(settings)  # output checks and the files still to do, before any weight is read
        if plan.pending == 0:
            return sess.finish(plan.summary)
        prompt_fn = build_prompt_fn(
            args.high_level_info, prompt=args.prompt, added_prompt=args.added_prompt, captions_file=args.captions,
            classifier_weights=args.classifier_weights, categories_file=args.categories_file,
            detector_weights=args.detector_weights, captioner=args.captioner, caption_model=args.caption_model,
            cache_dir=args.prompt_cache, separator=args.added_prompt_separator, control_type=tasks.control_type(task))
        prompt_fn = tasks.with_added_prompt(task, prompt_fn, args.added_prompt, args.added_prompt_separator)
        cache = False if args.no_cache else args.cache_dir
        lora_specs = [parse_lora_arg(a, default_multiplier=args.lora_multiplier, rule=args.lora_rule)
                      for a in args.lora or ()]
        args.ckpt, args.base = sess.weights(args.ckpt, args.base)  # Hugging Face names -> the HF cache
        loaded = load_for_sampling(args.ckpt, base=args.base, personalized=args.personalized,
                                   blending_alpha=args.blending_alpha, lora=lora_specs,
                                   lora_multiplier=args.lora_multiplier, lora_rule=args.lora_rule,
                                   lcm_lora=args.lcm_lora, cache=cache, scheduler_config=args.scheduler_config,
                                   scheduler_beside=task == tasks.COLORIZE, param_dtype=DTYPES[args.dtype])
        scheduler_from_config(loaded.scheduler_config, options.scheduler, options.steps)  # refused keys: now
    except (PasdError, ValueError, FileNotFoundError, MissingDependencyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in loaded.notes:
        logging.info(note)
    logging.info("PASD variant %s; sampling %s with %s, %d steps, %s", loaded.variant, args.input, options.scheduler,
                 options.steps, args.dtype)
    pipe = PASDPipeline(loaded.models, loaded.params, loaded.scheduler_config, loaded.tokenizer_dir,
                        devices=sess.devices)
    return sess.execute(pipe, options, plan, settings, prompt_fn)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
