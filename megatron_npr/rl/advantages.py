"""Group-relative advantages (GRPO/DAPO and PAPO) and DAPO's informative-group test.

Every function here is pure: inputs are never modified, results are new float64 tensors
(advantages are per sample, so precision costs nothing; the loss casts them to the log-prob
dtype). Group ids are arbitrary integers: groups may be uneven (PAPO drops invalid rollouts
before scoring, so groups shrink) and need not be contiguous in the batch.

Conventions:
- std is the unbiased one (torch.std's default, as GRPO/verl and the PAPO reference).
- A group of one sample has no baseline but itself. Default (`singleton="zero"`): its advantage
  is 0, exactly like an all-equal group: the advantage stays invariant to shifting all rewards
  by a constant, and a lone sample can never be divided by a near-zero batch std into a huge
  advantage. `singleton="raw"` reproduces verl/the PAPO reference instead: mean 0 (and std 1 in
  group mode), i.e. A = R / (1 + eps) in group mode and R / (std_batch + eps) in batch mode.
- The batch std of fewer than two rewards is taken as 1 (torch.std would give nan).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

StdOver = Literal["group", "batch"]
Singleton = Literal["zero", "raw"]


def _check(rewards: Tensor, groups: Tensor) -> None:
    if rewards.dim() != 1 or groups.shape != rewards.shape:
        raise ValueError(f"rewards and groups must be 1-D of the same length, got {tuple(rewards.shape)} "
                         f"and {tuple(groups.shape)}")
    if groups.is_floating_point() or groups.is_complex():
        raise ValueError(f"groups must be integer ids, got {groups.dtype}")


def group_stats(rewards: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample: the mean, unbiased std (0 for a group of one) and size of its group; float64."""
    _check(rewards, groups)
    r = rewards.detach().to(torch.float64)
    _, index, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64, device=r.device).index_add(0, index, r)
    mean = (sums / counts)[index]
    squares = torch.zeros_like(sums).index_add(0, index, (r - mean) ** 2)
    var = squares / (counts - 1).clamp(min=1)  # a group of one has no spread: 0 / 1
    return mean, var.sqrt()[index], counts[index]


def batch_std(rewards: Tensor) -> Tensor:
    """Unbiased std of all rewards (float64 scalar), computed once from the raw values; 1 for
    fewer than two rewards."""
    r = rewards.detach().to(torch.float64)
    return r.std() if r.numel() >= 2 else torch.ones((), dtype=torch.float64, device=r.device)


def group_advantages(rewards: Tensor, groups: Tensor, *, std_over: StdOver = "group", eps: float = 1e-6,
                     singleton: Singleton = "zero") -> Tensor:
    """A_i = (R_i - mean of i's group) / (std + eps), float64 [N].

    - `std_over="group"` (GRPO/DAPO): the unbiased std of i's group; an all-equal group gives 0.
    - `std_over="batch"` (PAPO): the unbiased std of ALL raw rewards, one number for the batch.
      (The PAPO reference rescales its score tensor in place inside the loop, so sample i is
      divided by the std of partly normalised values; this is the formula it meant.)
    - groups of one sample: see the module docstring (`singleton`).
    """
    if std_over not in ("group", "batch"):
        raise ValueError(f"std_over must be 'group' or 'batch', got {std_over!r}")
    if singleton not in ("zero", "raw"):
        raise ValueError(f"singleton must be 'zero' or 'raw', got {singleton!r}")
    mean, std, size = group_stats(rewards, groups)
    r = rewards.detach().to(torch.float64)
    alone = size == 1
    if singleton == "raw":
        mean = torch.where(alone, torch.zeros_like(mean), mean)
    if std_over == "group":
        std = torch.where(alone, torch.ones_like(std), std)
    else:
        std = batch_std(rewards).expand_as(r)
    advantages = (r - mean) / (std + eps)
    if singleton == "zero":
        advantages = torch.where(alone, torch.zeros_like(advantages), advantages)
    return advantages


def informative(rewards: Tensor, groups: Tensor) -> Tensor:
    """bool [N]: True where the sample's group has rewards that are not all equal (DAPO's dynamic
    sampling keeps exactly these groups: the others have zero advantage, hence no gradient). A
    group of one is never informative."""
    _check(rewards, groups)
    r = rewards.detach().to(torch.float64)
    _, index = torch.unique(groups, return_inverse=True)
    size = int(index.max()) + 1 if index.numel() else 0
    low = torch.zeros(size, dtype=torch.float64, device=r.device).scatter_reduce(0, index, r, "amin",
                                                                                 include_self=False)
    high = torch.zeros_like(low).scatter_reduce(0, index, r, "amax", include_self=False)
    return (high > low)[index]
