"""Memory per GPU of one training rank, component by component (bytes). What is counted follows
what Megatron-Core 0.16 allocates in this project's setup (training/trainer.py):

- weights: the DDP param buffer in params dtype (it replaces the module's parameters);
- gradients: the DDP grad buffer, fp32 (`grad_reduce_in_fp32=True`), whole on every DP rank;
- optimizer: DistributedOptimizer shards over DP: Adam exp_avg and exp_avg_sq in fp32, plus an
  fp32 main copy of the shard when params are bf16/fp16 (fp32 params are stepped in place);
- activations: what autograd keeps per layer for a packed row (see `layer_activation_bytes`);
- logits: the vocab-parallel cross entropy keeps softmax [tokens, vocab/tp] in fp32;
- transient: the larger of the two peaks around the loss: the forward's logits plus their shifted
  fp32 copy, or backward's whole weight gradient of the largest weight (made in params dtype
  before it is added into the fp32 buffer).
"""
from __future__ import annotations

from dataclasses import dataclass

from .estimate_model import ModelDims

GiB = 2 ** 30


@dataclass(frozen=True)
class RankLayout:
    tp: int
    pp: int
    dp: int
    stage: int
    inflight: int  # microbatches whose activations this stage holds at once (1F1B: pp - stage)


@dataclass(frozen=True)
class Workload:
    row_tokens: int  # tokens of one microbatch: micro_rows x max_tokens
    rows: int  # micro_rows (the mask is per row)
    param_bytes: int  # 4 fp32, 2 bf16/fp16 (activations use the same dtype)
    backend: str  # attention backend
    recompute: str  # "none" | "full"


def layer_activation_bytes(d: ModelDims, w: Workload, tp: int) -> int:
    """What autograd keeps for one layer and one microbatch, counted from the saved tensors of the
    Megatron layer on CPU (tensors kept by the backward nodes, de-duplicated by storage):
    two RMSNorms 3h each, the inputs of qkv and fc1 (h each) and of o-proj (q/tp), the fused qkv
    output, q and k after norm and rotary (2 each), the attention output kept by o-proj, the MLP's
    fc1 output (2f/tp), SiLU output and product (f/tp each) and fc2's input; rotary cos/sin
    (4 head_dim); the softmax log-sum-exp (fp32). `sdpa` also keeps its additive copy of the dense
    mask per layer (rows x s x s in the activation dtype); `flex`/`triton` keep no s x s tensor."""
    s, a = w.row_tokens, w.param_bytes
    per_token = (8 * d.hidden + (5 * d.q_dim + 4 * d.kv_dim + 5 * d.ffn) // tp + 4 * d.head_dim) * a
    per_token += d.heads // tp * 4
    mask = w.rows * (s // w.rows) ** 2 * a if w.backend in ("sdpa", "te") else 0
    return s * per_token + mask


def activation_bytes(d: ModelDims, w: Workload, r: RankLayout, recompute: str) -> int:
    """All layers of this stage for its in-flight microbatches. Full recompute keeps only each
    layer's input (s x h), plus one layer's full set while that layer is recomputed."""
    layers = d.layers // r.pp
    one_layer = layer_activation_bytes(d, w, r.tp)
    if recompute == "full":
        return layers * r.inflight * w.row_tokens * d.hidden * w.param_bytes + one_layer
    return layers * r.inflight * one_layer


def mask_bytes(w: Workload, r: RankLayout) -> int:
    """The batch's dense bool mask [rows, 1, s, s] (sdpa/te), one per in-flight microbatch."""
    if w.backend not in ("sdpa", "te"):
        return 0
    return r.inflight * w.rows * (w.row_tokens // w.rows) ** 2


def logits_bytes(d: ModelDims, w: Workload, r: RankLayout) -> int:
    """Last stage only: the cross entropy's fp32 softmax [tokens, vocab/tp], plus the final norm
    (3h) and the output layer's input (h) of the microbatch whose loss is being taken."""
    if r.stage != r.pp - 1:
        return 0
    return w.row_tokens * (d.vocab // r.tp * 4 + 4 * d.hidden * w.param_bytes)


def transient_bytes(d: ModelDims, w: Workload, r: RankLayout) -> int:
    weight_grad = d.largest_tensor(r.tp) * w.param_bytes
    if r.stage != r.pp - 1:
        return weight_grad
    forward_logits = w.row_tokens * d.vocab // r.tp * (w.param_bytes + 4)
    return max(weight_grad, forward_logits)


def training_components(d: ModelDims, w: Workload, r: RankLayout) -> dict[str, int]:
    """Bytes per component on one rank of stage `r.stage` (the engine is added by the caller)."""
    params = d.stage_params(r.tp, r.pp, r.stage)
    main_copy = 4 if w.param_bytes < 4 else 0
    acts = {mode: activation_bytes(d, w, r, mode) for mode in ("none", "full")}
    return {
        "weights": params * w.param_bytes,
        "gradients (fp32 buffer)": params * 4,
        "optimizer (Adam m+v" + (", fp32 main" if main_copy else "") + f"; /dp={r.dp})":
            -(-params // r.dp) * (8 + main_copy),
        "activations": acts[w.recompute],
        "attention mask (sdpa)": mask_bytes(w, r),
        "logits (fp32 softmax)": logits_bytes(d, w, r),
        "transient (loss / weight grad)": transient_bytes(d, w, r),
        "_activations_none": acts["none"],
        "_activations_full": acts["full"],
    }


def engine_components(d: ModelDims, weight_bytes: int, kv_slots: int, tp: int = 1) -> dict[str, int]:
    """A rollout engine's share of one GPU: HF-layout weights (lm_head counted when untied) and
    the KV cache kv_slots x layers x 2 (k, v) x kv_heads x head_dim, split over the engine's TP."""
    kv = kv_slots * d.layers * 2 * d.kv_dim * weight_bytes
    return {"engine weights": d.total_params() * weight_bytes // tp, "engine KV cache": kv // tp}
