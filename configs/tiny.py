"""The PASD training pipeline with tiny random-init models: CPU tests and the offline demo.

    python train.py --config configs/tiny.py --workdir runs/tiny --config.steps=100

The models are the tiny PASD UNet / ControlNet of the golden set and the tiny VAE / CLIP text encoder of the tiny
pipeline (shipped under pasd_jax/assets/tiny), the SD1.5 tokenizer, 64-pixel procedural images (8x8 latents), fp32.
About a minute for 100 steps on 2 CPU cores; the run writes its random base next to the checkpoints (workdir/base).
"""
from __future__ import annotations

from configs import pasd_v1

TINY = pasd_v1.ASSETS / "tiny"


def get_config():
    c = pasd_v1.get_config()
    c.steps = 100
    c.batch_size = 4
    c.grad_accum = 1
    c.model.unet_config = str(TINY / "unet")
    c.model.vae_config = str(TINY / "vae")
    c.model.text_encoder_config = str(TINY / "text_encoder")
    c.model.compute_dtype = "float32"
    c.optim.lr = 1e-4
    c.data.sources = ({"kind": "procedural", "n": 256, "size": 64, "seed": 0, "weight": 1.0},)
    c.data.crop_size = 64
    c.data.probe_records = 2
    c.loader.num_workers = 1
    c.sharding.min_size = 0
    c.log_every = 10
    c.checkpoint_every = 50
    c.max_to_keep = 2
    c.validation.dtype = "float32"
    c.validation.steps = 4
    c.validation.process_size = 64
    return c
