"""Per-rollout rewards: DAPO's (format penalty or correctness, plus overlong shaping) and PAPO's
structural filter (invalid rollouts are dropped before scoring, the rest score +1 / -1).

Correctness is always decided by the caller (a grader from `megatron_npr.rewards`), so these
functions stay pure and cheap; structure is always decided by `megatron_npr.topology`, the one
module that knows the grammar.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..topology import TagIds, TopologyError, format_reward, parse_structure

if TYPE_CHECKING:
    from ..rollout import Rollout


def overlong_penalty(response_tokens: int, max_new_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to `max_new_tokens - buffer` tokens, then linear
    down to -factor at `max_new_tokens`. 0 when `buffer == 0` (shaping off)."""
    if not 0 <= buffer <= max_new_tokens:
        raise ValueError(f"overlong buffer {buffer} outside [0, max_new_tokens={max_new_tokens}]")
    if buffer == 0:
        return 0.0
    excess = response_tokens - (max_new_tokens - buffer)
    return min(-excess / buffer * factor, 0.0) + 0.0  # + 0.0 turns -0.0 into 0.0


def correctness_rewards(correct: Sequence[bool]) -> list[float]:
    """+1 for a correct answer, -1 otherwise (PAPO's reward, and DAPO's for valid structures)."""
    return [1.0 if c else -1.0 for c in correct]


def _same_length(**lists) -> int:
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"one entry per rollout expected, got lengths {lengths}")
    return next(iter(lengths.values()))


def dapo_rewards(texts: Sequence[str], correct: Sequence[bool], response_tokens: Sequence[int], *,
                 max_new_tokens: int, overlong_buffer: int, overlong_factor: float = 1.0,
                 max_depth: int = 1) -> tuple[list[float], list[str | None]]:
    """Stage-1 (NPR-Zero) reward of each rollout, and why it was penalised for its format.

    - invalid structure (`format_reward(text).score < 0`, a value in (-2, 0)): that score, and
      the first defect's reason; `correct` is ignored, so the caller may pass False for rollouts
      it did not grade;
    - valid: +1 if correct else -1, reason None;
    - every rollout, valid or not: plus `overlong_penalty(response_tokens, ...)`.
    `texts` are the decoded responses with the tags as text (no prompt)."""
    _same_length(texts=texts, correct=correct, response_tokens=response_tokens)
    rewards: list[float] = []
    reasons: list[str | None] = []
    for text, ok, length in zip(texts, correct, response_tokens):
        fmt = format_reward(text, max_depth)
        base, reason = (fmt.score, fmt.reasons[0]) if fmt.score < 0 else (1.0 if ok else -1.0, None)
        rewards.append(base + overlong_penalty(length, max_new_tokens, overlong_buffer, overlong_factor))
        reasons.append(reason)
    return rewards, reasons


def papo_drop_reason(rollout: Rollout, tags: TagIds, *, max_depth: int = 1) -> str | None:
    """Why PAPO drops this rollout before scoring, or None to keep it:
    - "length": it hit the token budget (finish_reason "length");
    - a topology reason (`TopologyError.reason`, e.g. "missing_block", "unclosed_block"): its
      token ids do not parse as a response with at least one block;
    - "invalid_structure": it parses, but the engine did not finish it cleanly (finish_reason
      other than "stop", or no layout to train it under)."""
    if rollout.finish_reason == "length":
        return "length"
    try:
        parse_structure(rollout.token_ids, tags, rollout.response_start, max_depth, require_block=True)
    except TopologyError as error:
        return error.reason
    if rollout.finish_reason != "stop" or rollout.layout is None:
        return "invalid_structure"
    return None


def papo_filter(rollouts: Sequence[Rollout], tags: TagIds, *, max_depth: int = 1) -> list[str | None]:
    """`papo_drop_reason` of every rollout (None = kept)."""
    return [papo_drop_reason(r, tags, max_depth=max_depth) for r in rollouts]
