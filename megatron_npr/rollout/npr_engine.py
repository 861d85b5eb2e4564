"""NPREngine: the torch rollout backend (CPU runs, single-GPU runs, the reference for others).

The engine owns the model, its KV cache and the slot pool, and runs every forward: chunked
prefill of each admitted prompt, then one batched forward per decoding step. Everything about
samples (trees of streams, fork/join, sampling, finishing) is the scheduler's (`scheduler.py`).
"""
from __future__ import annotations

import numbers
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..topology import TagIds
from .pool import SlotPool
from .qwen3_torch import ATTENTION, KVCache, Qwen3Spec, Qwen3Weights, forward
from .rollout import Rollout
from .sampling import SamplingParams
from .scheduler import DecodeStep, DecodeVocab, RolloutScheduler

PROMPT_EXPECTED = "a non-empty list (or tuple) of int token ids, or a 1-D integer tensor/array"


class NPREngine:
    """A `RolloutBackend` (see backend.py) running Qwen3 in torch. `decode_attention="triton"` runs
    decoding steps on the split-K kernel in kernels/npr_decode_attention.py (prefill keeps SDPA)."""

    def __init__(self, hf_config: dict, tensors: Mapping | Iterable, *, tags: TagIds, eos_ids: Iterable[int],
                 label_ids: Callable[[int], list[int]], kv_slots: int = 1 << 16, prefill_chunk: int = 512,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", decode_attention: str = "sdpa"):
        check_decode_attention(decode_attention, device)
        spec = Qwen3Spec.from_hf_config(hf_config)
        if max(tags.ids) >= spec.vocab_size:
            raise ValueError(f"NPR tag ids {tags.ids} do not fit the model's vocabulary of {spec.vocab_size}; "
                             "convert the checkpoint with --add-npr-tokens")
        self.spec, self.vocab = spec, DecodeVocab(tags, frozenset(eos_ids), label_ids)
        self.weights = Qwen3Weights(spec, tensors if isinstance(tensors, Mapping) else dict(tensors), dtype, device)
        self.cache = KVCache(spec, kv_slots, dtype, device)
        self.pool = SlotPool(kv_slots)
        self.prefill_chunk, self.device, self.decode_attention = prefill_chunk, device, decode_attention

    @classmethod
    def from_hf(cls, hf_dir, tokenizer_dir=None, **kwargs) -> "NPREngine":
        """An HF Qwen3 folder; the vocabulary (tags, eos and label ids) from `load_vocab`: the
        tokenizer of `tokenizer_dir`, else of the model folder, else the bundled Qwen3 one."""
        from ..checkpoint import open_hf_weights, read_hf_config
        from ..data.tokenizer import load_vocab

        hf_dir = Path(hf_dir)
        vocab, config = load_vocab(hf_dir, tokenizer_dir), read_hf_config(hf_dir)
        vocab.check_fits(config["vocab_size"], f"model {hf_dir}")
        with open_hf_weights(hf_dir) as weights:
            return cls(config, weights, tags=vocab.tags, eos_ids=vocab.eos_ids, label_ids=vocab.label_ids, **kwargs)

    # ---------------------------------------------------------------- RolloutBackend
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named tensors (what the trainer exports) in place; returns how many."""
        return self.weights.update(named_tensors)

    def begin_weight_update(self) -> None:
        """No-op: `update_weights` copies in place, and no cache outlives a `generate` call."""

    def end_weight_update(self, version: int) -> None:
        """No-op: the KV pool is empty between calls, so nothing holds the old weights' keys."""

    def release_memory(self, tags: list[str] | None = None) -> None:
        """No-op: the torch engine keeps its weights and KV cache (it does not share a device
        with a trainer)."""

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """No-op (see release_memory)."""

    def close(self) -> None:
        """No-op: nothing runs outside this object."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 replay: list[list[int]] | None = None, seeds: list[int] | None = None) -> list[Rollout]:
        """n rollouts per prompt, prompt-major. Every KV slot is free again on return. `replay`
        gives one response per prompt to reproduce instead of sampling (benchmarks, tests): the
        engine still forks, joins and scores every token. `seeds` gives each prompt its own seed
        (instead of params.seed and the prompt's index), so its samples do not depend on batching.

        A prompt is a non-empty list or tuple of ints in [0, vocab_size); a 1-D integer torch
        tensor or numpy array is converted. Anything else raises ValueError naming the prompt."""
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of prompts ({PROMPT_EXPECTED} each), "
                             f"got {type(prompts).__name__}")
        prompts = [prompt_token_ids(p, i, self.spec.vocab_size) for i, p in enumerate(prompts)]
        if replay is not None and len(replay) != len(prompts):
            raise ValueError(f"replay has {len(replay)} responses for {len(prompts)} prompts")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
        sched = RolloutScheduler(params, self.vocab, self.pool)
        for i, p in enumerate(prompts):
            if sched.slots_needed(len(p)) > self.pool.num_slots:
                raise ValueError(f"prompt {i} needs {sched.slots_needed(len(p))} KV slots (n x (prompt + "
                                 f"max_new_tokens)); the pool has {self.pool.num_slots}: raise kv_slots or "
                                 "lower max_new_tokens")
        queue = deque(range(len(prompts)))
        try:
            while queue or sched.busy:
                while queue and sched.try_reserve(len(prompts[queue[0]])):  # the rest wait for memory
                    i = queue.popleft()
                    slots, logits = self._prefill(prompts[i])
                    sched.admit(i, prompts[i], slots, logits, replay[i] if replay else None,
                                None if seeds is None else seeds[i])
                sched.retire_finished()
                step = sched.next_step()
                if step is not None:
                    sched.advance(step, self._decode(step))
                sched.retire_finished()
        except BaseException:
            self.pool.reset()  # a failed call (bad replay, interrupt) must not leave the next one a leak
            raise
        self.pool.assert_empty()
        return sched.rollouts(len(prompts))

    # ---------------------------------------------------------------- forwards
    def _prefill(self, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt in chunks (each chunk sees the ones before it); returns its slots and
        the logits at its last token."""
        slots, logits = torch.empty(0, dtype=torch.long), None
        for start in range(0, len(prompt), self.prefill_chunk):
            chunk = prompt[start:start + self.prefill_chunk]
            slots = torch.cat([slots, self.pool.allocate(len(chunk))])
            ends = torch.arange(start + 1, start + len(chunk) + 1)
            logits = forward(self.weights, self.cache, torch.tensor(chunk), torch.arange(start, start + len(chunk)),
                             slots[start:], slots.expand(len(chunk), -1), ends)
        return slots, logits[-1]

    def _decode(self, step: DecodeStep) -> torch.Tensor:
        """One batched forward over every running stream's next token."""
        return forward(self.weights, self.cache, step.tokens, step.positions, step.write_slots,
                       step.visible_slots, step.lengths, attention=self.decode_attention)


def check_decode_attention(decode_attention: str, device: str) -> None:
    """ValueError unless the engine can decode with `decode_attention` on `device`; loads the Triton
    kernel (and so triton) only when it is chosen, at construction rather than at the first step."""
    if decode_attention not in ATTENTION:
        raise ValueError(f"decode_attention must be one of {ATTENTION}, got {decode_attention!r}")
    if decode_attention == "triton":
        from ..kernels import triton_sources
        triton_sources.load("npr_decode_attention")
        if torch.device(device).type != "cuda" and not triton_sources.interpreted():
            raise ValueError(f"decode_attention='triton' runs on CUDA (or in Triton's interpreter with "
                             f"TRITON_INTERPRET=1), not on device {device!r}")


def prompt_token_ids(prompt, index: int, vocab_size: int) -> list[int]:
    """Prompt `index` as a list of Python ints, or ValueError saying what is wrong with it."""
    if isinstance(prompt, torch.Tensor) or hasattr(prompt, "__array__"):  # torch or numpy
        dtype = getattr(prompt, "dtype", None)
        integer = (not prompt.is_floating_point() and not prompt.is_complex() and dtype != torch.bool
                   if isinstance(prompt, torch.Tensor) else getattr(dtype, "kind", "") in ("i", "u"))
        if getattr(prompt, "ndim", None) != 1 or not integer:
            raise ValueError(f"prompt {index}: expected {PROMPT_EXPECTED}, got a {getattr(prompt, 'ndim', '?')}-D "
                             f"{type(prompt).__name__} of {dtype}")
        ids = prompt.tolist()
    elif isinstance(prompt, (list, tuple)):
        for j, x in enumerate(prompt):
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                raise ValueError(f"prompt {index}: expected {PROMPT_EXPECTED}, but item {j} is "
                                 f"{type(x).__name__} {_short(x)}")
        ids = [int(x) for x in prompt]
    else:
        raise ValueError(f"prompt {index}: expected {PROMPT_EXPECTED}, got {type(prompt).__name__} {_short(prompt)}")
    if not ids or min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"prompt {index} is empty or has ids outside [0, {vocab_size})")
    return ids


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
