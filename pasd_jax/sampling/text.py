"""Prompt encoding for the sampler: a cache of text-encoder outputs (token ids come from `pasd_jax.tokenizer`).

SD semantics (spec 4.3): ids padded to the tokenizer's max length (77) with truncation, no attention mask, and the
text encoder's `last_hidden_state`. The encoder runs outside the sampling program, one prompt at a time through a
program compiled once per dtype, and every result is cached by (prompt, dtype): a folder run reuses the same
negative prompt (and often the same prompt) for every image, so the encoder runs once per distinct string.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.tokenizer import tokenize

MAX_CACHED_PROMPTS = 1024


class TextEncoderCache:
    """Encodes prompts with a CLIP text encoder and keeps the [77, D] outputs by (prompt, dtype), LRU-bounded.

    `params_for(name)` returns the text encoder's params in the dtype of that name ("float32", "bfloat16", ...;
    the pipeline's cast-and-place cache), `module_for(name)` the module computing in it.
    """

    def __init__(self, tokenizer: Any, module_for: Callable[[Any], Any], params_for: Callable[[Any], Any],
                 on_trace: Callable[[str], None], max_entries: int = MAX_CACHED_PROMPTS):
        self.tokenizer = tokenizer
        self._module_for = module_for
        self._params_for = params_for
        self._on_trace = on_trace
        self._max = max_entries
        self._cache: collections.OrderedDict[tuple[str, str], jax.Array] = collections.OrderedDict()
        self._programs: dict[str, Callable] = {}

    def clear(self) -> None:
        """Forget cached embeddings (the text encoder's params changed); compiled programs stay."""
        self._cache.clear()

    def _program(self, dtype: Any) -> Callable:
        name = jnp.dtype(dtype).name
        if name not in self._programs:
            module = self._module_for(name)

            def encode(params, ids):
                self._on_trace("text_encoder")
                return module.apply({"params": params}, ids)
            self._programs[name] = jax.jit(encode)
        return self._programs[name]

    def encode(self, prompts: Sequence[str], dtype: Any) -> jax.Array:
        """[N, 77, D] encoder outputs for `prompts` in `dtype` (cached per distinct prompt)."""
        name = jnp.dtype(dtype).name
        missing = [p for p in dict.fromkeys(prompts) if (p, name) not in self._cache]
        if missing:
            program, params = self._program(dtype), self._params_for(name)
            ids = tokenize(self.tokenizer, missing)
            for p, row in zip(missing, ids):
                self._cache[(p, name)] = program(params, jnp.asarray(row[None]))[0]
        out = []
        for p in prompts:
            self._cache.move_to_end((p, name))
            out.append(self._cache[(p, name)])
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return jnp.stack(out)

    def __len__(self) -> int:
        return len(self._cache)
