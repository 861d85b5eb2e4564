"""Sampling parameters and the per-stream sampler."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 1024  # every generated or forced token of every branch counts
    max_branches: int = 8  # a guideline with more plans (or none) fails the pre-branch check
    step_repetition_penalty: float = 1.02  # inside <step> only, on tokens of the current branch
    parallel: bool = True  # False: decode the same format sequentially (stage 1, rejection sampling)
    max_depth: int = 1  # nesting of blocks the engine will fork
    on_bad_plan: str = "finish"  # "finish" (invalid_structure) or "continue" sequentially
    seed: int = 0

    def __post_init__(self):
        checks = {"n": self.n >= 1, "temperature": self.temperature >= 0, "top_p": 0 < self.top_p <= 1,
                  "top_k": self.top_k == -1 or self.top_k >= 1, "max_new_tokens": self.max_new_tokens >= 1,
                  "max_branches": self.max_branches >= 1, "step_repetition_penalty": self.step_repetition_penalty > 0,
                  "max_depth": self.max_depth >= 1, "on_bad_plan": self.on_bad_plan in ("finish", "continue")}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"SamplingParams: invalid {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)}")


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty on the tokens in `seen` (bool [vocab]): positive logits divided,
    negative ones multiplied, by `penalty`."""
    if penalty == 1.0 or not seen.any():
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from fp32 logits [vocab] with temperature, top-k and top-p."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return _inverse_cdf(probs, generator)


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from `probs` with a single uniform: ~10x cheaper than torch.multinomial over a
    151k vocabulary on a CPU (cumsum in float64 so the tail keeps its mass)."""
    cdf = probs.double().cumsum(0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=probs.numel() - 1))
