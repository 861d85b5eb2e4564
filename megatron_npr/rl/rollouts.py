"""The rollout side of the RL loop: where the engine and the grader run, how their results reach
every trainer rank, and how the trainer's weights reach the engine (with a version number).

Placement today: one rollout backend (the torch `NPREngine` unless one is given) and the grader
live on global rank 0. Rank 0 generates and grades; the results are broadcast
(`broadcast_object_list`), so every rank builds the same global batch and trains its DP share.
The loop only calls `generate`, `grade`, `release_memory` and `sync`, so another placement
(engines on other processes, weights over a process group) changes this file, not the loop.

Weight versions: version 0 is the weights the engine loaded itself; `sync(trainer, v)` streams
`trainer.hf_tensors()` buckets into `engine.update_weights` on rank 0 (every rank takes part in
the gather) and then stamps v on every rollout generated until the next sync
(`rollout.stats["weight_version"]`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ..rollout import Rollout, RolloutBackend, SamplingParams


def _is_engine_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _from_engine_rank(value: Any) -> Any:
    """`value` of rank 0 on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RolloutManager:
    def __init__(self, make_engine: Callable[[], RolloutBackend], make_grader: Callable[[], Any],
                 bucket_bytes: int = 512 << 20):
        """`make_engine` / `make_grader` are called on the engine's rank only."""
        self.engine = make_engine() if _is_engine_rank() else None
        self.grader = make_grader() if _is_engine_rank() else None
        self.bucket_bytes = bucket_bytes
        self.version = 0
        self._released = False

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Rollout]:
        """`params.n` rollouts per prompt (prompt-major) on every rank, each stamped with the
        weight version that produced it."""
        rollouts = None
        if self.engine is not None:
            if self._released:
                self.engine.resume_memory()
                self._released = False
            rollouts = self.engine.generate(prompts, params, seeds=seeds)
            for r in rollouts:
                r.stats["weight_version"] = self.version
        return _from_engine_rank(rollouts)

    def grade(self, predictions: list[str], golds: list[str]) -> list[bool]:
        """Graded once (math-verify may time out: two ranks grading alike could disagree)."""
        verdicts = self.grader.grade(predictions, golds) if self.grader is not None else None
        return _from_engine_rank(verdicts)

    def release_memory(self) -> None:
        """Give the device memory back to the trainer (a no-op for an engine that does not share one)."""
        if self.engine is not None and not self._released:
            self.engine.release_memory()
            self._released = True

    def sync(self, trainer, version: int) -> dict:
        """Collective: the trainer's weights into the engine; later rollouts carry `version`."""
        started = time.perf_counter()
        if self.engine is not None and self._released:
            self.engine.resume_memory()
            self._released = False
        tensors = nbytes = 0
        for bucket in trainer.hf_tensors(self.bucket_bytes):  # non-empty on rank 0 only
            if self.engine is not None:
                tensors += self.engine.update_weights(bucket)
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        self.version = version
        return {"sync_tensors": tensors, "sync_bytes": nbytes, "sync_time_s": time.perf_counter() - started}

    def close(self) -> None:
        if self.grader is not None:
            self.grader.close()
