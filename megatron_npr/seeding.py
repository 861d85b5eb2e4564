"""Reproducible seeds, derived by hashing: one per (seed, prompt, sample, branch path), and one per
problem id, so results never depend on batching, order or resuming."""
from __future__ import annotations

import hashlib


def stream_seed(*parts: int) -> int:
    """A distinct, reproducible 63-bit seed for each (seed, prompt, sample, branch path)."""
    digest = hashlib.blake2b(".".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def problem_seed(seed: int, problem_id: str, round_index: int = 0) -> int:
    """A problem's own seed: independent of batching, order and resuming."""
    id_hash = int.from_bytes(hashlib.blake2b(problem_id.encode(), digest_size=8).digest(), "little")
    return stream_seed(seed, id_hash, round_index)
