"""The `Rollout` record every backend returns, and the one train/inference log-prob mismatch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..topology import Layout


@dataclass
class Rollout:
    """One sample as the engine produced it; the trainer builds its row from these ids and layout.

    `logprobs[i]` is log p(response token i) under the raw model (temperature 1) in the context
    the engine used when it emitted the token. For sampled tokens that context is exactly the
    layout's, so the trainer's log-prob on the flattened sequence equals it (tested within 1e-5).
    For forced tokens (`forced_mask[i]`, inserted by the engine: each branch's `<step>` and label,
    each block's `<takeaway>`) it is only a record of what the model thought of the insertion: the
    `<step>` opening branch j >= 2 is scored from the trunk's state after `</guideline>`, whereas
    the flattened sequence predicts it from branch j-1's `</step>`. Forced tokens are therefore
    never a training target and never part of a train/inference mismatch (`logprob_mismatch`).
    """
    token_ids: list[int]  # prompt + response
    response_start: int
    layout: Layout | None  # None when the response is not a valid (complete) structure
    logprobs: list[float]  # per response token, in the engine's context (see above)
    forced_mask: list[bool]  # per response token: inserted by the engine, not sampled
    positions: list[int]  # engine position of every token, prompt included
    finish_reason: str  # stop | length | invalid_structure
    stats: dict = field(default_factory=dict)


def logprob_mismatch(rollout: Rollout, trainer_logprobs) -> torch.Tensor:
    """|engine - trainer| log-prob of every response token the engine sampled (float64, forced
    tokens left out). `trainer_logprobs` has one entry per response token, as `rollout.logprobs`.
    The one place a train/inference mismatch is computed: forced tokens cannot leak into it."""
    engine = torch.tensor(rollout.logprobs, dtype=torch.float64)
    trainer = torch.as_tensor(trainer_logprobs, dtype=torch.float64).flatten()
    sampled = ~torch.tensor(rollout.forced_mask, dtype=torch.bool)
    if not engine.shape == trainer.shape == sampled.shape:
        raise ValueError(f"{trainer.numel()} trainer log-probs for {engine.numel()} response tokens "
                         f"({sampled.numel()} forced flags)")
    return (engine - trainer)[sampled].abs()
