"""What one web-UI request asks for (`Settings`) and the two named starting points.

`SAMPLE_DEFAULTS` are `pasd-sample`'s defaults (the official `test_pasd.py` ones), so a result from the page is
reproduced by `pasd-sample` with the same flags. `OFFICIAL_DEMO` is what the official `gradio_pasd.py` runs;
`OFFICIAL_DEMO_NOTES` lists, side by side, where it differs and what the preset does about it (shown on the page).
"""
from __future__ import annotations

import dataclasses

from pasd_jax.prompts import DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT, HIGH_LEVEL_INFO
from pasd_jax.sampling import tasks
from pasd_jax.sampling.options import DTYPES, SamplingOptions
from pasd_jax.schedulers import ANS_MODES, SCHEDULER_KINDS

PROMPT_SOURCES = ("none", "classification")  # the high-level information the app can compute itself

OFFICIAL_DEMO_ADDED_PROMPT = "clean, high-resolution, 8k, best quality, masterpiece"
OFFICIAL_DEMO_NEGATIVE_PROMPT = ("dotted, noise, blur, lowres, oversmooth, longbody, bad anatomy, bad hands, "
                                 "missing fingers, extra digit, fewer digits, cropped, worst quality, low quality")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a request sets besides the image; validated on construction (one-line messages)."""
    task: str = tasks.SR
    upscale: int = 1
    process_size: int = 768
    prompt: str = ""
    added_prompt: str = DEFAULT_ADDED_PROMPT
    added_prompt_separator: bool = False
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    high_level_info: str = "none"
    steps: int = 20
    scheduler: str = "unipc"
    guidance_scale: float = 9.0
    conditioning_scale: float = 1.0
    init_noise: bool = False
    added_noise_level: int = 900
    ans_mode: str = "paper"
    seed: int = 0
    color_fix: str = "wavelet"
    latent_tile_size: int = 320
    latent_tile_overlap: int = 8
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "task", tasks.resolve(self.task))
        checks = [
            (isinstance(self.upscale, int) and 1 <= self.upscale <= 8, f"upscale must be 1 to 8, got {self.upscale}"),
            (isinstance(self.process_size, int) and self.process_size >= 64,
             f"process size must be at least 64 pixels, got {self.process_size}"),
            (self.high_level_info in HIGH_LEVEL_INFO, f"prompt source must be one of {PROMPT_SOURCES}"),
            (self.scheduler in SCHEDULER_KINDS, f"scheduler must be one of {SCHEDULER_KINDS}"),
            (self.ans_mode in ANS_MODES, f"ANS mode must be one of {ANS_MODES}"),
            (self.color_fix in tasks.COLOR_FIXES, f"colour fix must be one of {tasks.COLOR_FIXES}"),
            (self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}"),
            (isinstance(self.seed, int) and 0 <= self.seed < 2 ** 63, f"seed must be an integer >= 0, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.options()  # the sampler's own checks (steps, tiles, scales), with its messages

    def options(self) -> SamplingOptions:
        return SamplingOptions(steps=self.steps, scheduler=self.scheduler, guidance_scale=self.guidance_scale,
                               conditioning_scale=self.conditioning_scale, added_noise_level=self.added_noise_level,
                               ans_mode=self.ans_mode, init_noise=self.init_noise,
                               latent_tile_size=self.latent_tile_size, latent_tile_overlap=self.latent_tile_overlap,
                               dtype=self.dtype)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def sample_command(self, image: str = "<image>") -> str:
        """The `pasd-sample` flags that reproduce this request on the command line (weights flags aside)."""
        flags = [f"--input {image}"] + ([f"--task {self.task}"] if self.task != tasks.SR else [])
        flags += [f"--upscale {self.upscale}",
                 f"--process-size {self.process_size}", f"--seed {self.seed}", f"--steps {self.steps}",
                 f"--scheduler {self.scheduler}", f"--guidance-scale {self.guidance_scale:g}",
                 f"--conditioning-scale {self.conditioning_scale:g}", f"--color-fix {self.color_fix}",
                 f"--latent-tile-size {self.latent_tile_size}", f"--latent-tile-overlap {self.latent_tile_overlap}",
                 f"--dtype {self.dtype}", f"--high-level-info {self.high_level_info}"]
        flags += ["--init-noise"] if self.init_noise else [f"--added-noise-level {self.added_noise_level}",
                                                            f"--ans-mode {self.ans_mode}"]
        flags += [f"--prompt {_quote(self.prompt)}", f"--added-prompt {_quote(self.added_prompt)}",
                  f"--negative-prompt {_quote(self.negative_prompt)}"]
        if self.added_prompt_separator:
            flags.append("--added-prompt-separator")
        return "pasd-sample " + " ".join(flags)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


SAMPLE_DEFAULTS = Settings()

OFFICIAL_DEMO = Settings(upscale=2, added_prompt=OFFICIAL_DEMO_ADDED_PROMPT, added_prompt_separator=True,
                         negative_prompt=OFFICIAL_DEMO_NEGATIVE_PROMPT, high_level_info="classification",
                         guidance_scale=7.5, conditioning_scale=1.1, init_noise=True, latent_tile_size=256)

# (setting, official gradio_pasd.py, pasd-sample / test_pasd.py default, what the preset does)
OFFICIAL_DEMO_NOTES = (
    ("prompt source", "ResNet-50 ImageNet class, always", "none (the official test script captions)",
     "classification when the app has --classifier-weights, else none"),
    ("prompt", "pre-filled \"Asian\"", "empty", "empty: type it if you want it"),
    ("added prompt", f"\"{OFFICIAL_DEMO_ADDED_PROMPT}\", joined with \", \"", f"\"{DEFAULT_ADDED_PROMPT}\", glued on",
     "the demo's"),
    ("negative prompt", "a longer list (anatomy, quality words)", f"\"{DEFAULT_NEGATIVE_PROMPT}\"", "the demo's"),
    ("start", "pure noise (ANS off)", "ANS at level 900", "pure noise"),
    ("guidance / conditioning", "7.5 / 1.1", "9.0 / 1.0", "7.5 / 1.1"),
    ("upscale", "2", "1", "2"),
    ("latent tile", "256, overlap 8", "320, overlap 8", "256, overlap 8"),
    ("steps, scheduler, colour fix", "20, UniPC, wavelet", "20, UniPC, wavelet", "same"),
    ("precision", "fp16", "bf16 (pasd-sample), fp32 here on a CPU", "unchanged: pick it below"),
    ("seed", "never reaches its generator", "per image from --seed and the file name", "the seed you set"),
    ("weights", "a personalized SD model (majicMIX realistic)", "the PASD checkpoint", "whatever the app loaded"),
)
