"""Rollouts: the parallel decoding engine (torch backend) and its sampling parameters."""
from .engine import Rollout, Script, logprob_mismatch
from .npr_engine import NPREngine
from .pool import PoolError, SlotPool
from .sampling import SamplingParams

__all__ = ["NPREngine", "PoolError", "Rollout", "SamplingParams", "Script", "SlotPool", "logprob_mismatch"]
