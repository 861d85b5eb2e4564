"""Rollouts: the backend interface, the parallel decoding engine (torch backend), its scheduler,
the SGLang backend, the rollout group, the weight transports, sampling parameters and the Rollout
record.

    backend.py           RolloutBackend, the Protocol evaluation/rejection sampling/RL program against
    npr_engine.py        NPREngine, the torch backend: model, KV cache, prefill and batched forwards
    group.py             EngineGroup: engines on ranks of their own, requests spread, failures named
    weight_transport.py  weights over a process group, on SGLang's update_weights_from_distributed wire
    tensor_payload.py    weights as per-TP-rank payloads for SGLang's update_weights_from_tensor
    sglang_backend.py    SGLangBackend: NPR decoding over SGLang's offline Engine (causal join)
    sglang_streams.py    its client-side requests, stream pieces and lockstep budget
    sglang_join_plugin.py  the exact join as an SGLang plugin: design and hint format (unvalidated)
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
