"""Evaluation of super-resolution results: PSNR/SSIM/NIQE (numpy, basicsr-exact), learned metrics through pyiqa,
reports in the layout of PASD's Table 1, comparison pictures, and the ANS level sweep (`sweep`, which samples and
so imports JAX; not imported here). The CLI is `python -m pasd_jax.evaluate` (`pasd-evaluate`)."""
from pasd_jax.evaluate.errors import EvaluationError, MetricInputError
from pasd_jax.evaluate.image_read import read_rgb
from pasd_jax.evaluate.niqe import niqe, niqe_of_y
from pasd_jax.evaluate.psnr_ssim import psnr, ssim
from pasd_jax.evaluate.registry import METRICS, MetricSpec, parse_metrics
from pasd_jax.evaluate.runner import Evaluation, Options, evaluate

__all__ = ["EvaluationError", "MetricInputError", "read_rgb", "niqe", "niqe_of_y", "psnr", "ssim", "METRICS",
           "MetricSpec", "parse_metrics", "Evaluation", "Options", "evaluate"]
