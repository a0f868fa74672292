"""PASD training at SD1.5 scale: the official recipe (train_pasd.py / train_pasd.sh, spec section 5).

    python train.py --config configs/pasd_v1.py --workdir runs/pasd \\
        --config.model.base=checkpoints/stable-diffusion-v1-5 \\
        --config.data.sources='({"kind": "folder", "path": "/data/hq", "weight": 1.0},)'

AdamW (lr 5e-5, betas 0.9/0.999, eps 1e-8, weight decay 1e-2 on the trainable params only), constant lr, gradient
clipping 1.0, 512 crops, 50 % null captions, DDPM epsilon loss on the SD1.5 schedule, degradation-removal L1 at 1/2,
1/4, 1/8 with weight 1. `batch_size` is the global number of samples per optimizer step: 64 = 4 per device x 8
devices x grad_accum 2, the paper's setting. On N devices keep 4 per device with --config.batch_size=8*N.
Trainable: the whole ControlNet (initialised from the UNet) + PACA (fp32 master weights); the SD base (UNet, VAE,
CLIP text encoder) is frozen and stored in the compute dtype (bf16).
"""
from __future__ import annotations

import pathlib

import ml_collections

from data_pipeline.config import get_data_config
from pasd_jax.prompts.rules import DEFAULT_NEGATIVE_PROMPT

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "pasd_jax" / "assets"


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 500_000
    c.batch_size = 64
    c.grad_accum = 2

    c.model = ml_collections.ConfigDict(dict(
        variant="pasd",            # pasd | pasd_light
        base="",                   # diffusers SD1.5 folder with unet/, vae/, text_encoder/ (frozen base)
        init_from="",              # optional: a PASD checkpoint (unet/ + controlnet/) or one of our run dirs
        # Used only when `base` is empty: random-init base models from these config.json folders (tiny runs).
        unet_config=str(ASSETS / "sd15" / "unet"),
        vae_config=str(ASSETS / "sd15" / "vae"),
        text_encoder_config=str(ASSETS / "sd15" / "text_encoder"),
        use_rrdb=False,
        trainable=("pixel_attentions", "norm2_plus", "attn2_plus", "proj_in_plus"),
        compute_dtype="bfloat16",
        remat=False,
        conditioning_scale=1.0,
    ))
    c.diffusion = ml_collections.ConfigDict(dict(
        scheduler=str(ASSETS / "sd15" / "scheduler"),
        null_text_ratio=0.5,
        dr_loss_weight=1.0,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=5e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, momentum=0.0,
        max_grad_norm=1.0, warmup_steps=0))
    c.data = get_data_config()     # the data pipeline's own section: sources, crop_size, degradation, ...
    c.loader = ml_collections.ConfigDict(dict(
        source="pipeline",         # "pipeline": data_pipeline's Grain loader; "synthetic": random images (benchmarks)
        num_workers=8,             # Grain worker processes per host (a resumed run must keep the same number)
        tokenizer=str(ASSETS / "sd15" / "tokenizer"),
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # (regex on the parameter path, mesh axes of its trailing dims); first match wins, the rest is replicated.
    # A dim that the axis does not divide, or a parameter under min_size elements, stays replicated.
    c.sharding = ml_collections.ConfigDict(dict(
        rules=((r"(to_out_0|ff/net_2|proj_out)/kernel$", ("tensor", "fsdp")),
               (r"kernel$", ("fsdp", "tensor")),
               (r"embedding$", (None, "fsdp"))),
        min_size=2 ** 14,
    ))
    # Multi-host (GPU clusters, TPU pods): jax.distributed.initialize(); empty / -1 values are auto-detected
    # (SLURM, Open MPI, Kubernetes, Cloud TPU). Every host runs the same command and reads its own data shard.
    c.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=-1, process_id=-1))

    # Validation samples: every `every` steps (0: off) and at the end, the LQ images under `images` (a file or a
    # small folder: a preemption signal is acted on after the samples) are super-resolved with the current weights
    # into <workdir>/validation/step_<N>/; a failing validation is reported and training goes on.
    c.validation = ml_collections.ConfigDict(dict(
        every=0, images="", upscale=4, process_size=512, steps=20, scheduler="unipc", guidance_scale=9.0,
        added_noise_level=900, prompt="", negative_prompt=DEFAULT_NEGATIVE_PROMPT, seed=0, dtype="bfloat16"))

    c.log_every = 50
    c.checkpoint_every = 10_000
    c.max_to_keep = 3
    c.export_at_end = True
    c.progress = True
    return c
