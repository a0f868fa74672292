"""PASD colorization training (the released `pasd_light_color` model: pasd_light, `--control_type grayscale`).

    python train.py --config configs/pasd_light_color.py --workdir runs/pasd_light_color \\
        --config.model.base=checkpoints/stable-diffusion-v1-5 \\
        --config.data.sources='({"kind": "folder", "path": "/data/colour_photos", "weight": 1.0},)'

Everything of configs/pasd_v1.py (AdamW 5e-5, batch 64, 512 crops, 50 % null captions, DR L1 pyramid), with the
official grayscale rules (spec 5, 6.4):
- data: conditioning = the crop in L replicated to 3 channels (in [0, 1] at the ControlNet), target = the colour
  crop; no Real-ESRGAN degradation (`data.pairs = "grayscale"`);
- loss: + 0.001 x colorfulness of the three DR outputs. `colorfulness_terms="official"` counts it 3 times as
  train_pasd.py's loop does; "single" is the one term the code means (train.losses has the details);
- schedule: zero terminal SNR. train_pasd.py builds its DDPMScheduler from `<sd>/scheduler`; the released colour
  model ships a zero-SNR scheduler beside its checkpoint and the PASD README says it avoids "the leaking residual
  signal from RGB image during training", so the training schedule is SD1.5's with `rescale_betas_zero_snr`
  (trailing spacing for sampling). The released file itself could not be obtained (see the tiny_pipeline_gray
  golden README): the prediction type is taken from the scheduler config, epsilon here; set
  `"prediction_type": "v_prediction"` in a copy of the file and point `diffusion.scheduler` at it for v;
- export: the scheduler config is written to `scheduler/` beside the exported checkpoint, the release layout, so
  `pasd-sample --task colorize --ckpt <workdir>/export/checkpoint-N` finds it;
- validation samples (when enabled) colorize: gray input, the colour prompt rule, the YUV merge.
"""
from __future__ import annotations

from configs import pasd_v1
from pasd_jax.prompts.rules import GRAYSCALE_NEGATIVE_PROMPT

ZERO_SNR_SCHEDULER = pasd_v1.ASSETS / "sd15_zero_snr" / "scheduler"


def color_settings(c):
    """Turn a PASD training config into the colorization recipe (used by get_config and the tiny CPU tests)."""
    c.model.variant = "pasd_light"
    c.data.pairs = "grayscale"
    c.diffusion.scheduler = str(ZERO_SNR_SCHEDULER)
    c.diffusion.colorfulness_weight = 0.001
    c.diffusion.colorfulness_terms = "official"   # or "single"
    c.diffusion.colorfulness_batch = 4            # the official per-GPU batch the per-image terms are summed over
    c.diffusion.export_scheduler = True
    c.validation.task = "colorize"
    c.validation.upscale = 1
    c.validation.negative_prompt = GRAYSCALE_NEGATIVE_PROMPT
    return c


def get_config():
    return color_settings(pasd_v1.get_config())
