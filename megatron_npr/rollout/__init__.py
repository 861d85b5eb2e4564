"""Rollouts: the backend interface, the parallel decoding engine (torch backend), its scheduler,
sampling parameters and the Rollout record.

    backend.py     RolloutBackend, the Protocol evaluation/rejection sampling/RL program against
    npr_engine.py  NPREngine, the torch backend: model, KV cache, prefill and batched forwards
    scheduler.py   RolloutScheduler: sample trees, token decisions, fork/join, slot references
    pool.py        SlotPool: reference-counted KV slots with reservations
    replay.py      Script: a response to reproduce instead of sampling
    rollout.py     Rollout and logprob_mismatch
    sampling.py    SamplingParams and the per-stream sampler
"""
from .backend import RolloutBackend
from .npr_engine import NPREngine
from .pool import PoolError, SlotPool
from .replay import ReplayMismatch, Script
from .rollout import Rollout, logprob_mismatch
from .sampling import SamplingParams

__all__ = ["NPREngine", "PoolError", "ReplayMismatch", "Rollout", "RolloutBackend", "SamplingParams", "Script", "SlotPool",
           "logprob_mismatch"]
