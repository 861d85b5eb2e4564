"""`npr plan`: memory per GPU and time per step of an SFT or RL config on N nodes x G GPUs,
before anything runs. Every number comes with the assumption behind it (Estimate.assumptions).

    est = estimate(cfg, nodes=8, gpus_per_node=8, gpu="h100", model_config=resolve_model_config(cfg))
    est.fits, est.warnings, est.lines(), est.to_json()

Memory: estimate_memory.py (what Megatron allocates, component by component, on the worst rank).
Time: 6 x params x tokens plus attention over the NPR mask's visible pairs at a stated MFU;
rollout decode from memory bandwidth over the canonical tree's critical path (estimate_shape.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .estimate_memory import GiB, RankLayout, Workload, engine_components, training_components
from .estimate_model import ModelDims, PlanInputError, resolve_model_config
from .estimate_shape import CANONICAL, GPUS, TreeShape, shape_facts

__all__ = ["Estimate", "PlanInputError", "estimate", "resolve_model_config"]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DECODE_BW_EFFICIENCY = 0.6  # achieved / peak HBM bandwidth of a decode step (batched, paged KV)


@dataclass
class Estimate:
    kind: str  # "sft" | "rl"
    gpu: str
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    rank: str  # which rank the memory rows describe (the worst)
    memory_gib: dict[str, float]
    activations_gib: dict[str, float]  # both recompute settings, for comparison
    usable_gib: float
    time_s: dict[str, float]
    tokens_per_step: int
    assumptions: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return sum(self.memory_gib.values())

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.usable_gib

    def to_json(self) -> dict:
        return {"kind": self.kind, "gpu": self.gpu, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "tp": self.tp, "pp": self.pp, "dp": self.dp, "rank": self.rank, "memory_gib": self.memory_gib,
                "total_gib": self.total_gib, "usable_gib": self.usable_gib, "fits": self.fits,
                "activations_gib": self.activations_gib, "time_s": self.time_s,
                "tokens_per_step": self.tokens_per_step, "assumptions": self.assumptions, "warnings": self.warnings}

    def lines(self) -> list[str]:
        out = [f"{self.kind} on {self.nodes} x {self.gpus_per_node} {GPUS[self.gpu]['name']}: tp {self.tp} x pp "
               f"{self.pp} x dp {self.dp}; memory of {self.rank}, GiB per GPU"]
        out += [f"  {name:<44} {gib:9.2f}" for name, gib in self.memory_gib.items() if gib > 0]
        out.append(f"  {'total':<44} {self.total_gib:9.2f}  of {self.usable_gib:.2f} usable "
                   f"({'fits' if self.fits else 'DOES NOT FIT'})")
        out += [f"  {'activations with recompute=' + mode:<44} {gib:9.2f}" for mode, gib in self.activations_gib.items()]
        out += [f"  {name:<44} {sec:9.1f} s" for name, sec in self.time_s.items()]
        out += ["assumptions:"] + [f"  - {a}" for a in self.assumptions]
        out += [f"WARNING: {w}" for w in self.warnings]
        return out


def _config_kind(cfg) -> str:
    return "rl" if hasattr(cfg, "rl") else "sft"


def _dtype_bytes(name: str, gpu: str, key: str) -> int:
    if name == "auto":  # sections.torch_dtype: bf16 on a GPU, fp32 on a CPU
        return 4 if gpu == "cpu" else 2
    if name not in DTYPE_BYTES:
        raise PlanInputError(f"{key}={name!r}: choose one of auto, {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _check_layout(d: ModelDims, tp: int, pp: int, world: int) -> None:
    if world % (tp * pp):
        raise PlanInputError(f"parallel.tp={tp} x parallel.pp={pp} does not divide {world} GPUs")
    for key, size, dims in (("parallel.tp", tp, (("num_attention_heads", d.heads), ("num_key_value_heads", d.kv_heads),
                                                  ("intermediate_size", d.ffn), ("vocab_size", d.vocab))),
                            ("parallel.pp", pp, (("num_hidden_layers", d.layers),))):
        for name, value in dims:
            if value % size:
                raise PlanInputError(f"{key}={size} does not divide the model's {name}={value}")


def _train_shape(cfg, kind: str, dp: int, shape: TreeShape):
    """(row tokens, rows per microbatch, microbatches per rank per optimizer step, tokens per step,
    tokens per document, attention visible fraction, parallel decoding)."""
    if kind == "sft":
        max_tokens, micro = cfg.data.max_tokens, cfg.train.micro_rows
        try:
            rows = cfg.train.rows_per_step(max_tokens, dp)
        except ValueError as e:
            raise PlanInputError(str(e)) from None
        facts = shape_facts(shape, max(max_tokens - shape.prompt_tokens, 64))
        return max_tokens, micro, rows // (dp * micro), rows * max_tokens, max_tokens, facts.visible_fraction, True
    max_tokens, micro = cfg.rl.max_tokens, cfg.rl.micro_rows
    parallel = cfg.sampling.parallel
    rollouts = cfg.rl.prompts_per_step * cfg.sampling.n
    doc = shape.prompt_tokens + int(shape.response_fill * cfg.sampling.max_new_tokens)
    tokens = rollouts * doc
    rows = math.ceil(tokens / max_tokens)
    microbatches = max(1, math.ceil(rows / (dp * micro * cfg.rl.updates_per_batch)))
    fraction = shape_facts(shape, cfg.sampling.max_new_tokens, parallel).visible_fraction
    return max_tokens, micro, microbatches, tokens, doc, fraction, parallel


def _engine_on_worst_gpu(cfg, d: ModelDims, gpu: str) -> tuple[dict[str, int], str]:
    """The rollout engine's share of the GPU that also hosts global rank 0 (RL only)."""
    r, e = cfg.rollout, cfg.engine
    wbytes = _dtype_bytes(e.dtype, gpu, "engine.dtype")
    if gpu != "cpu" and not str(e.device).startswith("cuda") and r.backend == "torch":
        return {}, f"engine.device={e.device}: the torch engine is not on a GPU (host memory, not counted)"
    if r.backend == "sglang" and r.mem_fraction:
        share = r.mem_fraction * GPUS[gpu]["memory_gb"] * 1e9
        return ({"engine (SGLang mem_fraction_static)": int(share)},
                f"SGLang takes rollout.mem_fraction={r.mem_fraction} of each GPU it shares")
    tp = r.tp if r.backend == "sglang" else 1
    where = ("in global rank 0's process" if r.placement == "colocated"
             else f"{r.engines} engine process(es) sharing the trainer's GPUs, one per GPU at most")
    return engine_components(d, wbytes, e.kv_slots, tp), (
        f"rollout engine ({r.backend}, {where}): weights in engine.dtype + KV cache engine.kv_slots={e.kv_slots} "
        f"x layers x 2 x kv_heads x head_dim" + (f", split over rollout.tp={tp}" if tp > 1 else ""))


def _worst_rank(d: ModelDims, w: Workload, tp: int, pp: int, dp: int, microbatches: int,
                stages: range | None = None):
    """Components of the stage with the largest total (1F1B: stage i holds pp - i microbatches)."""
    best = None
    for stage in stages if stages is not None else range(pp):
        r = RankLayout(tp, pp, dp, stage, max(1, min(microbatches, pp - stage)))
        comps = training_components(d, w, r)
        total = sum(v for k, v in comps.items() if not k.startswith("_"))
        if best is None or total > best[0]:
            best = (total, stage, comps)
    return best[1], best[2]


def _train_seconds(d: ModelDims, tokens: int, doc_tokens: int, fraction: float, recompute: str, gpus: int,
                   peak_flops: float, mfu: float) -> tuple[float, float]:
    """(seconds, FLOPs) of forward + backward: 6 x matmul params x tokens (the layers and the
    output layer; the input embedding is a lookup), plus attention 4 x visible pairs x q_dim per
    layer forward, x3 with backward; full recompute adds one forward (x 4/3)."""
    matmul_params = d.layers * d.layer_params() + d.vocab * d.hidden
    pairs = tokens / doc_tokens * doc_tokens * (doc_tokens + 1) / 2 * fraction
    flops = 6 * matmul_params * tokens + 12 * d.layers * pairs * d.q_dim
    if recompute == "full":
        flops *= 4 / 3
    return flops / (gpus * peak_flops * mfu), flops


def _rollout_seconds(cfg, d: ModelDims, gpu: str, shape: TreeShape, mfu: float) -> tuple[float, list[str]]:
    """Decode from memory bandwidth: each decode step reads the weights once, and every token
    decoded reads the KV of what it sees (the tree's visible keys). Steps = the tree's critical
    path; rollouts beyond the KV capacity run in further waves; compute-bound when FLOPs win."""
    r, e, s = cfg.rollout, cfg.engine, cfg.sampling
    wbytes = _dtype_bytes(e.dtype, gpu, "engine.dtype")
    facts = shape_facts(shape, s.max_new_tokens, s.parallel)
    engines, tp = (1 if r.placement == "colocated" else r.engines), (r.tp if r.backend == "sglang" else 1)
    per_engine = math.ceil(cfg.rl.prompts_per_step * s.n / engines)
    kv_token = d.layers * 2 * d.kv_dim * wbytes
    slots, slots_from = e.kv_slots, f"engine.kv_slots={e.kv_slots}"
    if r.backend == "sglang" and r.mem_fraction:  # SGLang sizes its pool from its memory share, not kv_slots
        pool = r.mem_fraction * GPUS[gpu]["memory_gb"] * 1e9 * tp - d.total_params() * wbytes
        slots = max(1, int(pool // kv_token))
        slots_from = f"{slots} KV slots from rollout.mem_fraction={r.mem_fraction} x {tp} GPUs less the weights"
    waves = math.ceil(per_engine * facts.tokens / slots)
    per_wave = math.ceil(per_engine / waves)
    bw = GPUS[gpu]["hbm_tb_s"] * 1e12 * DECODE_BW_EFFICIENCY * tp
    read = facts.critical_path * d.total_params() * wbytes + per_wave * facts.response_kv_reads * kv_token
    compute = 2 * d.total_params() * per_wave * s.max_new_tokens / (GPUS[gpu]["tflops"] * 1e12 * tp * mfu)
    seconds = waves * max(read / bw, compute)
    notes = [f"rollout: {engines} engine(s) x tp {tp}, {per_engine} rollouts each in {waves} wave(s) of "
             f"{per_wave} ({slots_from}, {facts.tokens} KV slots per rollout); decode steps per "
             f"wave = critical path {facts.critical_path} of max_new_tokens={s.max_new_tokens} "
             f"({'parallel' if s.parallel else 'sequential'} decoding); HBM at {DECODE_BW_EFFICIENCY:.0%} of peak; "
             f"prefill, grading and weight sync not counted"]
    return seconds, notes


def estimate(cfg, nodes: int, gpus_per_node: int, gpu: str = "h100", model_config: dict | None = None,
             mfu: float = 0.4, shape: TreeShape = CANONICAL, stage: int | None = None) -> Estimate:
    """Memory per GPU (worst rank, or pipeline `stage`) and time per step of `cfg` (SFTConfig or
    RLConfig)."""
    if gpu not in GPUS:
        raise PlanInputError(f"--gpu {gpu}: choose one of {', '.join(GPUS)}")
    if nodes < 1 or gpus_per_node < 1 or not 0 < mfu <= 1:
        raise PlanInputError(f"--nodes {nodes}, --gpus-per-node {gpus_per_node}, --mfu {mfu}: need >= 1, >= 1, (0, 1]")
    kind = _config_kind(cfg)
    d = ModelDims.from_hf(model_config if model_config is not None else resolve_model_config(cfg))
    tp, pp, world = cfg.parallel.tp, cfg.parallel.pp, nodes * gpus_per_node
    _check_layout(d, tp, pp, world)
    dp = world // (tp * pp)
    pbytes = _dtype_bytes(cfg.model.dtype, gpu, "model.dtype")
    row_tokens, micro, microbatches, tokens, doc, fraction, parallel = _train_shape(cfg, kind, dp, shape)
    w = Workload(row_tokens * micro, micro, pbytes, cfg.model.attention_backend, cfg.parallel.recompute)
    stage, comps = _worst_rank(d, w, tp, pp, dp, microbatches, None if stage is None else range(stage, stage + 1))
    assumptions = [
        f"model: {d.total_params() / 1e9:.3f} B params (hidden {d.hidden}, {d.layers} layers, {d.heads}/{d.kv_heads} "
        f"heads x {d.head_dim}, ffn {d.ffn}, vocab {d.vocab}, {'tied' if d.tied else 'untied'})",
        f"params {8 * pbytes}-bit; fp32 grads; distributed optimizer over dp={dp}; "
        f"{microbatches} microbatch(es) of {micro} x {row_tokens} tokens per rank per step; 1F1B keeps pp - stage in flight",
        f"attention backend {cfg.model.attention_backend}" + (": s x s mask per layer" if w.backend in ("sdpa", "te")
                                                              else ": no s x s tensor"),
        f"attention FLOPs at the canonical NPR tree's visible-pair fraction {fraction:.3f} of causal "
        f"({shape.describe()})" if parallel else "attention FLOPs: causal (sequential decoding)",
        f"training at MFU {mfu} of {GPUS[gpu]['tflops']:.0f} TFLOP/s per GPU; "
        f"usable memory {GPUS[gpu]['memory_gb']:.0f} GB minus {GPUS[gpu]['reserve_gib']} GiB reserve",
    ]
    memory = {k: v for k, v in comps.items() if not k.startswith("_")}
    rank = f"pipeline stage {stage} of {pp}" + (", global rank 0" if stage == 0 else "")
    engines_everywhere = kind == "rl" and cfg.rollout.placement == "split" and cfg.rollout.launch == "external"
    if kind == "rl" and (stage == 0 or engines_everywhere):  # rank 0's engine, or one per node on every GPU
        engine, note = _engine_on_worst_gpu(cfg, d, gpu)
        memory.update(engine)
        assumptions.append(note)
    train_s, flops = _train_seconds(d, tokens, doc, fraction, cfg.parallel.recompute, world,
                                    GPUS[gpu]["tflops"] * 1e12, mfu)
    time_s = {"train step (forward+backward)": train_s}
    if kind == "rl":
        rollout_s, notes = _rollout_seconds(cfg, d, gpu, shape, mfu)
        time_s["rollout (decode)"] = rollout_s
        time_s["RL step (rollout + train)"] = rollout_s + train_s
        assumptions += notes
    assumptions.append(f"{tokens} trained tokens per step, {flops / 1e15:.1f} PFLOP")
    est = Estimate(kind, gpu, nodes, gpus_per_node, tp, pp, dp, rank,
                   {k: v / GiB for k, v in memory.items()},
                   {"none": comps["_activations_none"] / GiB, "full": comps["_activations_full"] / GiB},
                   GPUS[gpu]["memory_gb"] * 1e9 / GiB - GPUS[gpu]["reserve_gib"], time_s, tokens, assumptions)
    from .estimate_advice import advise
    est.warnings = advise(est, cfg, d)
    return est
