"""Policy-gradient losses in the trainer's LossFn form: `loss_fn(batch, logprobs) -> (sum, count,
{name: stack([sum, count])})`; the trainer divides by the token count of the global batch
(DAPO's token-mean) and reduces every metric as sum / count.

Alignment. `logprobs[:, i]` is log p(tokens[:, i+1]) (`models.token_logprobs`), while per-token
extras sit at the position of the token they belong to (`training.samples.to_sample`). So the
extras are shifted left by one (`align_with_targets`), and `batch.targets()[1]` is the mask: it
leaves out the prompt, engine-inserted (forced) tokens and document boundaries.

Extras read from `batch.extras`:
- "advantages": the sample's advantage on each of its response tokens (zero elsewhere);
- "old_logprobs" (clipped loss only): log p of each token under the policy that sampled it
  (or the policy before this batch's first update), token-aligned like `Rollout.logprobs`.
  `align_with_tokens` turns trainer log-probs (next-token aligned) into this form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..models import NPRBatch

# exp() of a log-ratio beyond this overflows in fp32, and 0 * inf = nan in the backward of a
# clipped token; clamping changes nothing for any policy that is not already diverged.
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class Clip:
    """PPO clip range [1 - low, 1 + high] (DAPO's clip-higher: high > low) and the dual clip:
    for A < 0 a token's loss is capped at -A * dual, so one very off-policy token cannot dominate."""
    low: float = 0.2
    high: float = 0.28
    dual: float = 10.0

    def __post_init__(self):
        if not (0 <= self.low < 1 and self.high >= 0 and self.dual > 1):
            raise ValueError(f"need 0 <= low < 1, high >= 0 and dual > 1, got {self}")


def align_with_targets(token_values: Tensor) -> Tensor:
    """[b, s] values at their tokens' positions -> at the positions that predict those tokens
    (entry i takes token i+1's value; the last column, which predicts nothing, is 0)."""
    out = torch.zeros_like(token_values)
    out[:, :-1] = token_values[:, 1:]
    return out


def align_with_tokens(target_values: Tensor) -> Tensor:
    """Inverse of `align_with_targets`: e.g. `MegatronTrainer.logprobs` output -> the token-aligned
    "old_logprobs" extra (token 0 is predicted by nothing: 0)."""
    out = torch.zeros_like(target_values)
    out[:, 1:] = target_values[:, :-1]
    return out


def _extra(batch: NPRBatch, name: str, like: Tensor) -> Tensor:
    if name not in batch.extras:
        raise KeyError(f"policy_loss needs the per-token extra {name!r} in batch.extras "
                       f"(has {sorted(batch.extras)})")
    return align_with_targets(batch.extras[name]).to(device=like.device, dtype=like.dtype)


def _pair(total: Tensor, count: Tensor) -> Tensor:
    return torch.stack([total.detach().to(torch.float32), count.to(torch.float32)])


def policy_loss(batch: NPRBatch, logprobs: Tensor, *, clip: Clip | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Summed policy-gradient loss over the valid target tokens, their count, and metrics.

    - `clip=None` (PAPO, strictly on-policy): loss_t = -A * exp(lp - stopgrad(lp)): value -A,
      gradient -A * grad(lp). Nothing is clipped, so every trained token gets gradient.
    - `clip=Clip(...)`: r = exp(lp - old); loss_t = max(-A r, -A clip(r, 1 - low, 1 + high)), and
      for A < 0 also min(loss_t, -A * dual).
    Metrics ([sum, count] pairs): "pg_loss"; with clip also "clip_fraction" (tokens whose loss is
    on a clipped, gradient-free side), "dual_clip_fraction", "ratio" and "approx_kl" (the k3
    estimate (r - 1) - log r of KL(old || new))."""
    _, valid = batch.targets()
    valid = valid.to(logprobs.device)
    advantages = _extra(batch, "advantages", logprobs)
    count = valid.sum().to(torch.int)
    if clip is None:
        # lp - lp.detach() is 0 in value, so the ratio is exactly 1 but carries grad(lp)
        per_token = -advantages * torch.exp(logprobs - logprobs.detach())
        loss = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
        return loss, count, {"pg_loss": _pair(loss, count)}

    old = _extra(batch, "old_logprobs", logprobs)
    # masked before exp: positions outside the loss hold arbitrary values (prompt, padding)
    log_ratio = torch.where(valid, logprobs - old, torch.zeros_like(logprobs)).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip.low, 1 + clip.high)
    per_token = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    per_token = torch.where(negative, torch.minimum(per_token, -advantages * clip.dual), per_token)
    loss = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()

    with torch.no_grad():
        r = ratio.detach()
        dual = negative & (r > clip.dual) & valid
        clipped_side = ((advantages > 0) & (r > 1 + clip.high)) | (negative & (r < 1 - clip.low))
        clipped_any = (clipped_side & valid) | dual
        kl = torch.where(valid, (r - 1) - log_ratio.detach(), torch.zeros_like(r))
        metrics = {
            "pg_loss": _pair(loss, count),
            "clip_fraction": _pair(clipped_any.sum(), count),
            "dual_clip_fraction": _pair(dual.sum(), count),
            "ratio": _pair(torch.where(valid, r, torch.zeros_like(r)).sum(), count),
            "approx_kl": _pair(kl.sum(), count),
        }
    return loss, count, metrics
