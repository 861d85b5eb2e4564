"""The two RL algorithms of the NPR recipe, by name, as data plus the few decisions the loop asks
them for (so the loop never branches on the algorithm's name).

DAPO (stage 1, NPR-Zero: the model learns the format)
    rollouts decoded sequentially (the model does not branch yet); every rollout is scored:
    format penalty in (-2, 0) for an invalid structure, else +1 / -1 correctness, plus overlong
    shaping; group advantages with the group's std; dynamic sampling keeps only groups whose
    rewards differ (the others carry no gradient); clipped loss with clip-higher 0.2 / 0.28 and
    dual clip 10, since each batch is used for several updates.

PAPO (stage 3, native parallel RL)
    rollouts decoded by the parallel engine; rollouts that hit the length limit or whose
    structure is invalid are dropped before scoring (the engine could not have trained them
    under a branch layout), so no format reward is needed and groups shrink; reward +1 / -1;
    advantages use the group mean but the std of the whole batch (small groups after dropping
    would make group stds noisy); no dynamic sampling; strictly on-policy: with one update per
    batch the loss is -A * logp (ratio 1 in value, never clipped, so branch-control tokens always
    get gradient). With several updates per batch the later ones are off-policy, so the loss
    becomes the clipped one (0.2 / 0.2, dual 10 as the reference script) against the log-probs
    recorded before the first update, instead of the reference's `old = logprob.detach()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .advantages import Singleton, StdOver, group_advantages, informative
from .losses import Clip, policy_loss
from .rewards import correctness_rewards, dapo_rewards, overlong_penalty, papo_filter

if TYPE_CHECKING:
    from ..models import NPRBatch
    from ..rollout import Rollout
    from ..topology import TagIds

LossFn = Callable[["NPRBatch", Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]  # = training.trainer.LossFn


@dataclass(frozen=True)
class Algorithm:
    name: str
    parallel: bool  # rollouts decoded by the parallel engine (True) or sequentially
    std_over: StdOver  # advantage denominator: the group's std or the batch's
    dynamic_sampling: bool  # keep only groups whose rewards are not all equal
    drops_invalid: bool  # drop length-capped / structurally invalid rollouts before scoring
    on_policy_loss: bool  # one update per batch -> the unclipped -A * logp loss
    clip: Clip = field(default_factory=Clip)  # the clipped loss's ranges

    def drop_reasons(self, rollouts: Sequence[Rollout], tags: TagIds, *, max_depth: int = 1) -> list[str | None]:
        """Why each rollout is left out before scoring (None = kept): `papo_filter` if this
        algorithm drops invalid rollouts, else nothing is dropped."""
        if self.drops_invalid:
            return papo_filter(rollouts, tags, max_depth=max_depth)
        return [None] * len(rollouts)

    def score(self, texts: Sequence[str], correct: Sequence[bool], response_tokens: Sequence[int], *,
              max_new_tokens: int, overlong_buffer: int = 0, overlong_factor: float = 1.0,
              max_depth: int = 1) -> tuple[list[float], list[str | None]]:
        """Reward of each kept rollout and its format defect (None when none counted).
        Dropping algorithms: +1 / -1 correctness (+ overlong shaping if a buffer is set; PAPO's
        recipe has none); the others: `dapo_rewards`."""
        if not self.drops_invalid:
            return dapo_rewards(texts, correct, response_tokens, max_new_tokens=max_new_tokens,
                                overlong_buffer=overlong_buffer, overlong_factor=overlong_factor,
                                max_depth=max_depth)
        if not len(texts) == len(correct) == len(response_tokens):
            raise ValueError(f"one entry per rollout expected: {len(texts)} texts, {len(correct)} grades, "
                             f"{len(response_tokens)} lengths")
        rewards = [r + overlong_penalty(n, max_new_tokens, overlong_buffer, overlong_factor)
                   for r, n in zip(correctness_rewards(correct), response_tokens)]
        return rewards, [None] * len(rewards)

    def select(self, rewards: Tensor, groups: Tensor) -> Tensor:
        """bool [N]: the samples this algorithm trains on (dynamic sampling: informative groups)."""
        if self.dynamic_sampling:
            return informative(rewards, groups)
        return torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)

    def advantages(self, rewards: Tensor, groups: Tensor, *, eps: float = 1e-6,
                   singleton: Singleton = "zero") -> Tensor:
        """float64 [N] advantages (`group_advantages` with this algorithm's std)."""
        return group_advantages(rewards, groups, std_over=self.std_over, eps=eps, singleton=singleton)

    def needs_old_logprobs(self, updates_per_batch: int) -> bool:
        """Whether the loss reads the "old_logprobs" extra (i.e. it is the clipped one)."""
        if updates_per_batch < 1:
            raise ValueError(f"updates_per_batch must be >= 1, got {updates_per_batch}")
        return not (self.on_policy_loss and updates_per_batch == 1)

    def loss(self, updates_per_batch: int, clip: Clip | None = None) -> LossFn:
        """The trainer's loss function: unclipped on-policy loss for an on-policy algorithm doing
        one update per batch, else the clipped loss with `clip` (default: this algorithm's)."""
        if not self.needs_old_logprobs(updates_per_batch):
            return partial(policy_loss, clip=None)
        return partial(policy_loss, clip=clip or self.clip)


DAPO = Algorithm("dapo", parallel=False, std_over="group", dynamic_sampling=True, drops_invalid=False,
                 on_policy_loss=False, clip=Clip(low=0.2, high=0.28, dual=10.0))
PAPO = Algorithm("papo", parallel=True, std_over="batch", dynamic_sampling=False, drops_invalid=True,
                 on_policy_loss=True, clip=Clip(low=0.2, high=0.2, dual=10.0))
ALGORITHMS: dict[str, Algorithm] = {"dapo": DAPO, "papo": PAPO}
