"""The CLIP tokenizer, loaded offline, and tokenization as the official code does it (spec 4.3 and 5).

One place for the sampler (a batch of prompts) and the data loader (one caption per training pair): ids padded
to the tokenizer's max length (77) with truncation, no attention mask.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


@functools.lru_cache(maxsize=4)
def _from_folder(path: str) -> Any:
    # transformers announces at import that PyTorch is missing; the tokenizer needs no torch, so users who need
    # none are not told about it (an explicit TRANSFORMERS_VERBOSITY still wins)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def load_tokenizer(tokenizer: Any) -> Any:
    """A `transformers.CLIPTokenizer`, or the folder of one (no download is ever attempted; cached per folder)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path} does not exist: it must hold the CLIP tokenizer files "
                                    "(vocab.json, merges.txt, tokenizer_config.json) of the SD base")
        return _from_folder(os.path.abspath(path))
    if not callable(tokenizer):
        raise TypeError(f"expected a CLIPTokenizer or a tokenizer folder, got {type(tokenizer).__name__}")
    return tokenizer


def tokenize(tokenizer: Any, prompts: Sequence[str] | str) -> np.ndarray:
    """[N, 77] int32 ids for a sequence of prompts, [77] for one string."""
    if isinstance(prompts, str):
        return tokenize(tokenizer, [prompts])[0]
    prompts = list(prompts)
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings, got {type(p).__name__}")
    length = int(tokenizer.model_max_length)
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
    return np.asarray(ids, np.int32)
