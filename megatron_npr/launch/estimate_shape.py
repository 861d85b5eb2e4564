"""The stated assumptions behind `npr plan`'s time rows: the canonical NPR tree shape (measured
with the project's topology module, the one place that knows the branch grammar) and the GPUs."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# Peak dense bf16 tensor throughput, HBM bandwidth and memory (NVIDIA data sheets, SXM parts).
# The CPU row is nominal: the CPU path is for memory validation, not timing.
GPUS = {
    "h100": dict(name="H100 SXM", tflops=989.0, hbm_tb_s=3.35, memory_gb=80.0, reserve_gib=4.0),
    "h200": dict(name="H200 SXM", tflops=989.0, hbm_tb_s=4.8, memory_gb=141.0, reserve_gib=4.0),
    "cpu": dict(name="CPU (nominal)", tflops=1.0, hbm_tb_s=0.05, memory_gb=24.0, reserve_gib=2.0),
}
# reserve: CUDA context, NCCL buffers and allocator fragmentation, kept out of the usable memory


@dataclass(frozen=True)
class TreeShape:
    """One response as a share of max_new_tokens: a trunk (text + guideline with one plan per
    branch), `branches` equal parallel steps, then the takeaway and the final answer. One round,
    no nesting, as in the paper's default (max_depth 1)."""
    prompt_tokens: int = 256
    branches: int = 4
    trunk_frac: float = 0.10
    branches_frac: float = 0.75  # all branches together
    takeaway_frac: float = 0.15  # takeaway and final answer
    response_fill: float = 0.5  # mean response length / max_new_tokens (for trained tokens)

    def describe(self) -> str:
        return (f"prompt {self.prompt_tokens} tok; response = trunk {self.trunk_frac:.0%} (guideline, "
                f"{self.branches} plans) + {self.branches} equal branches {self.branches_frac:.0%} + takeaway/answer "
                f"{self.takeaway_frac:.0%}; mean response {self.response_fill:.0%} of max_new_tokens")


CANONICAL = TreeShape()


def canonical_kinds(shape: TreeShape, response_tokens: int) -> list:
    """Token kinds of one canonical trajectory (topology.Kind), prompt included."""
    from ..topology import Kind

    branches = shape.branches
    trunk = max(int(response_tokens * shape.trunk_frac), 3 * branches + 3)
    branch = max(int(response_tokens * shape.branches_frac / branches), 3)
    tail = max(response_tokens - trunk - branch * branches, 4)
    plan_text = max((trunk - 3 - 2 * branches) // branches, 1)
    kinds = [Kind.TEXT] * shape.prompt_tokens + [Kind.TEXT, Kind.GUIDE_O]
    for _ in range(branches):
        kinds += [Kind.PLAN_O] + [Kind.TEXT] * plan_text + [Kind.PLAN_C]
    kinds.append(Kind.GUIDE_C)
    for _ in range(branches):
        kinds += [Kind.STEP_O] + [Kind.TEXT] * (branch - 2) + [Kind.STEP_C]
    kinds += [Kind.TAKE_O] + [Kind.TEXT] * (tail - 3) + [Kind.TAKE_C, Kind.TEXT]
    return kinds


def canonical_layout(shape: TreeShape, response_tokens: int):
    """The topology Layout of the canonical trajectory (parsed by the grammar: a malformed shape
    fails here rather than giving a number)."""
    from ..topology import layout_from_structure, parse_kinds

    structure, _ = parse_kinds(canonical_kinds(shape, response_tokens), shape.prompt_tokens, require_block=True)
    return layout_from_structure(structure)


def visible_pairs(layout) -> int:
    """Query-key pairs the NPR mask lets through (compact form: no L x L mask is built)."""
    q = torch.arange(layout.num_tokens)
    seen = q - layout.doc_start + 1
    for lo, hi in zip(layout.hole_lo, layout.hole_hi):
        seen = seen - (hi - lo)
    return int(seen.sum())


@dataclass(frozen=True)
class ShapeFacts:
    tokens: int  # prompt + response of the canonical trajectory
    visible_fraction: float  # visible pairs / causal pairs
    critical_path: int  # sequential decode steps for the response (topology.critical_path_length)
    response_kv_reads: int  # sum over response tokens of the keys each one reads while decoded

    def to_json(self) -> dict:
        return asdict(self)


def shape_facts(shape: TreeShape, response_tokens: int, parallel: bool = True) -> ShapeFacts:
    """Facts of one trajectory with a `response_tokens` response; `parallel=False` (DAPO, plain
    decoding): the same length, causal, critical path = its length."""
    from ..topology import critical_path_length

    length = shape.prompt_tokens + response_tokens
    causal = length * (length + 1) // 2
    prompt_pairs = shape.prompt_tokens * (shape.prompt_tokens + 1) // 2
    if not parallel:
        return ShapeFacts(length, 1.0, response_tokens, causal - prompt_pairs)
    layout = canonical_layout(shape, response_tokens)
    pairs = visible_pairs(layout)
    return ShapeFacts(layout.num_tokens, pairs / (layout.num_tokens * (layout.num_tokens + 1) // 2),
                      critical_path_length(layout, shape.prompt_tokens), pairs - prompt_pairs)
