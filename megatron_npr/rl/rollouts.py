"""The rollout side of the RL loop: where the engines and the grader run, how their results reach
every trainer rank, and how the trainer's weights reach the engines (with a version number).

Placement is configuration (`rollout:` in the YAML, `RolloutSection`), resolved once in
`build_backend`; the loop only calls `generate`, `grade`, `release_memory` and `sync`:

- `colocated`: one backend in global rank 0's process (the torch `NPREngine`, or SGLang on the
  same GPU with the tensor weight path); weights are handed over in process;
- `split`: an `EngineGroup` on rank 0 drives `rollout.engines` engine ranks (spawned by rank 0 or
  started by the launcher); weights go over a process group (`weight_transport`).

Rank 0 generates and grades; the results are broadcast (`broadcast_object_list`), so every rank
builds the same global batch and trains its DP share. A failure on rank 0 (an engine that died
or hung, a grader error) is broadcast too, so every rank raises `RolloutError` instead of
waiting for a batch that will not come; the run resumes from its last checkpoint.

Weight versions: version 0 is the weights the engine loaded itself; `sync(trainer, v)` runs the
update session (resume weights, begin, one `update_weights` per `trainer.hf_tensors()` bucket,
end with v, resume the KV cache) and stamps v on every rollout generated until the next sync
(`rollout.stats["weight_version"]`).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ..rollout import Rollout, RolloutBackend, SamplingParams
from ..rollout.backend import MEMORY_TAGS


def _is_engine_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _attempt(action: Callable[[], Any]) -> Exception | None:
    try:
        action()
    except Exception as e:  # noqa: BLE001 - raised on every rank by the caller
        return e
    return None


class RolloutError(RuntimeError):
    """Rollout or grading failed on the engine's rank (every rank raises it)."""


def _from_engine_rank(compute: Callable[[], Any]) -> Any:
    """`compute()` run on rank 0, its value (or its failure) on every rank."""
    value = failure = None
    if _is_engine_rank():
        try:
            value = compute()
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            failure = f"{type(e).__name__}: {e}"
            if not dist.is_initialized() or dist.get_world_size() == 1:
                raise RolloutError(failure) from e
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [(value, failure)]
        dist.broadcast_object_list(box, src=0)
        value, failure = box[0]
    if failure is not None:
        raise RolloutError(f"on the engine's rank: {failure}")
    return value


def build_backend(section, make_engine: Callable[[], RolloutBackend]) -> RolloutBackend:
    """The configured placement (`RolloutSection`) of engines built by `make_engine` (picklable
    for `split`: spawned engine processes call it)."""
    if section.placement == "colocated":
        return make_engine()
    from ..rollout.group import EngineGroup
    return EngineGroup.start(make_engine, engines=section.engines, host=section.host, port=section.port,
                             launch=section.launch, weight_backend=section.weight_backend,
                             flattened=section.flattened, timeout_s=section.timeout_s,
                             generate_timeout_s=section.generate_timeout_s)


def engine_factory_of(cfg, engine=None, factory=None):
    """What builds one engine: the given factory, the given engine (colocated only), or the config's."""
    if engine is not None:
        if cfg.rollout.placement != "colocated":
            raise ValueError("an engine object runs in this process: pass engine_factory for rollout.placement=split")
        return lambda: engine
    if factory is not None:
        return factory
    if cfg.rollout.engine_factory:
        return functools.partial(_named_factory, cfg.rollout.engine_factory, cfg)
    if cfg.rollout.backend == "sglang":
        from ..rollout.sglang_backend import SGLangBackend
        share = {"mem_fraction": cfg.rollout.mem_fraction} if cfg.rollout.mem_fraction else {}
        return functools.partial(SGLangBackend.from_config, cfg.engine.section(cfg.model), cfg.rollout, **share)
    return cfg.engine.section(cfg.model).build


def _named_factory(name: str, cfg) -> RolloutBackend:
    """`rollout.engine_factory: "module:function"`: function(cfg) builds the engine (picklable by name)."""
    import importlib

    module, _, function = name.partition(":")
    try:
        make = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rollout.engine_factory={name!r}: {e}") from e
    return make(cfg)


class RolloutManager:
    def __init__(self, make_engine: Callable[[], RolloutBackend], make_grader: Callable[[], Any],
                 bucket_bytes: int = 512 << 20):
        """`make_engine` / `make_grader` are called on the engine's rank only."""
        self.engine = make_engine() if _is_engine_rank() else None
        self.grader = make_grader() if _is_engine_rank() else None
        self.bucket_bytes = bucket_bytes
        self.version = 0
        self._released: set[str] = set()

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Rollout]:
        """`params.n` rollouts per prompt (prompt-major) on every rank, each stamped with the
        weight version that produced it."""
        def run():
            self._resume(None)
            rollouts = self.engine.generate(prompts, params, seeds=seeds)
            for r in rollouts:
                r.stats["weight_version"] = self.version
            return rollouts
        return _from_engine_rank(run)

    def grade(self, predictions: list[str], golds: list[str]) -> list[bool]:
        """Graded once (math-verify may time out: two ranks grading alike could disagree)."""
        return _from_engine_rank(lambda: self.grader.grade(predictions, golds))

    def release_memory(self) -> None:
        """Give the device memory back to the trainer (a no-op for an engine that does not share one)."""
        def release():
            if not self._released:
                self.engine.release_memory()
                self._released = set(MEMORY_TAGS)
        _from_engine_rank(release)

    def sync(self, trainer, version: int) -> dict:
        """Collective: the trainer's weights into the engine; later rollouts carry `version`. A
        failure on rank 0 lets the other ranks finish the gather, then fails every rank."""
        started, failure = time.perf_counter(), None
        tensors = nbytes = 0
        if self.engine is not None:
            failure = _attempt(lambda: (self._resume(["weights"]), self.engine.begin_weight_update()))
        for bucket in trainer.hf_tensors(self.bucket_bytes):  # non-empty on rank 0 only
            if self.engine is not None and failure is None:
                loaded = []
                failure = _attempt(lambda: loaded.append(self.engine.update_weights(bucket)))
                tensors += sum(loaded)
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)

        def finish():
            if failure is not None:
                raise failure
            self.engine.end_weight_update(version)
            self._resume(None)
        _from_engine_rank(finish)
        self.version = version
        return {"sync_tensors": tensors, "sync_bytes": nbytes, "sync_time_s": time.perf_counter() - started}

    def _resume(self, tags: list[str] | None) -> None:
        """After a release, in SGLang's order: the weights alone before an update, the rest
        (KV cache, CUDA graphs) before the next rollout."""
        todo = [t for t in (tags or MEMORY_TAGS) if t in self._released]
        if todo:
            self.engine.resume_memory(todo)
            self._released -= set(todo)

    def close(self) -> None:
        if self.grader is not None:
            self.grader.close()
        if self.engine is not None:
            self.engine.close()
