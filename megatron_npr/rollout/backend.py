"""`RolloutBackend`: what evaluation, rejection sampling and RL need from a rollout engine.

`NPREngine` (torch) is one backend; a colocated server engine (e.g. SGLang, sharing the GPU with
the trainer) is another. A training step with a colocated backend runs in this order:

    rollouts = backend.generate(prompts, params, seeds=seeds)
    backend.release_memory()          # free weights and KV cache for the trainer
    ... train ...
    backend.resume_memory()           # take the memory back
    backend.update_weights(trainer_weights)

The memory hooks map onto SGLang's release_memory_occupation / resume_memory_occupation; an engine
that does not share its device with a trainer implements them as no-ops.
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

from torch import Tensor

from .rollout import Rollout
from .sampling import SamplingParams


@runtime_checkable
class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 seeds: list[int] | None = None) -> list[Rollout]:
        """`params.n` rollouts per prompt, prompt-major. `seeds` gives each prompt its own seed so
        that its samples do not depend on how prompts are batched."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> int:
        """Load HF-named tensors (what the trainer exports) in place; returns how many."""
        ...

    def release_memory(self) -> None:
        """Give back the device memory of weights and KV cache (between rollout and training)."""
        ...

    def resume_memory(self) -> None:
        """Take the memory back before the next `update_weights` / `generate`."""
        ...
