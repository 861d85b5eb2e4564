"""`RolloutBackend`: what evaluation, rejection sampling and RL need from a rollout engine.

`NPREngine` (torch, in the trainer's process), `EngineGroup` (engines on their own ranks,
`group.py`) and `SGLangBackend` (`sglang_backend.py`) are the backends. An RL step drives any of
them in this order (`rl.rollouts.RolloutManager`), which is SGLang's colocation order:

    rollouts = backend.generate(prompts, params, seeds=seeds)
    backend.release_memory()                    # weights and KV cache back to the trainer
    ... train ...
    backend.resume_memory(["weights"])
    backend.begin_weight_update()
    for bucket in trainer.hf_tensors(bucket_bytes):
        backend.update_weights(bucket)
    backend.end_weight_update(version)          # caches flushed; later rollouts carry `version`
    backend.resume_memory(["kv_cache", "cuda_graph"])

The memory hooks map onto SGLang's release_memory_occupation / resume_memory_occupation (tags
"weights", "kv_cache", "cuda_graph"; None means all); an engine that does not share its device
with a trainer implements them as no-ops.
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

from torch import Tensor

from .rollout import Rollout
from .sampling import SamplingParams

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # SGLang's memory-occupation tags; None means all


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

    def begin_weight_update(self) -> None:
        """Open a weight update: `update_weights` calls follow (SGLang 0.5.21 refuses them outside one)."""
        ...

    def end_weight_update(self, version: int) -> None:
        """Close the update, flush every cache built with the old weights; rollouts generated from
        now on come from weight version `version`."""
        ...

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Give back the device memory of `tags` ("weights", "kv_cache", "cuda_graph"; None: all)."""
        ...

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Take the memory of `tags` back (None: all) before `update_weights` / `generate`."""
        ...

    def close(self) -> None:
        """Stop the engine (processes, servers) and free what it holds."""
        ...
