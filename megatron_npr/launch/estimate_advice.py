"""What `npr plan` tells a run that does not fit: the knob to turn, with its key, chosen by which
component dominates the worst rank's memory."""
from __future__ import annotations

from .estimate_model import ModelDims


def _train_keys(cfg) -> tuple[str, str, int]:
    """(max_tokens key, micro_rows key, micro_rows) of an RL or SFT config."""
    if hasattr(cfg, "rl"):
        return "rl.max_tokens", "rl.micro_rows", cfg.rl.micro_rows
    return "data.max_tokens", "train.micro_rows", cfg.train.micro_rows


def _next_tp(cfg, d: ModelDims) -> int | None:
    """The next TP size the model's heads, KV heads, ffn and vocab allow (None: none left)."""
    tp = cfg.parallel.tp * 2
    while tp <= d.kv_heads:
        if not (d.heads % tp or d.kv_heads % tp or d.ffn % tp or d.vocab % tp):
            return tp
        tp *= 2
    return None


def _activation_knob(cfg, d: ModelDims) -> str:
    max_key, micro_key, micro = _train_keys(cfg)
    if cfg.parallel.recompute == "none":
        return "parallel.recompute=full (keeps one layer's activations instead of all)"
    if micro > 1:
        return f"{micro_key}={micro // 2}"
    tp = _next_tp(cfg, d)
    return f"parallel.tp={tp} or a smaller {max_key}" if tp else f"a smaller {max_key}"


def _knob(component: str, cfg, d: ModelDims, excess_gib: float, est) -> str:
    max_key, _, _ = _train_keys(cfg)
    tp = _next_tp(cfg, d)
    if component == "activations":
        return _activation_knob(cfg, d)
    if component.startswith("attention mask"):
        return "model.attention_backend=flex (no s x s mask; sdpa materialises it per layer)"
    if component.startswith(("logits", "transient")):
        return f"parallel.tp={tp} (splits the vocabulary)" if tp else f"a smaller {max_key}"
    if component == "engine KV cache":
        gib = est.memory_gib[component]
        slots = int(cfg.engine.kv_slots * (gib - excess_gib) / gib) // 1024 * 1024
        return f"engine.kv_slots={slots} (or rollout.placement=split)" if slots > 0 else "rollout.placement=split"
    if component.startswith("engine"):
        share = cfg.rollout.mem_fraction
        lower = f"rollout.mem_fraction={max(share - excess_gib / est.memory_gib[component] * share, 0.05):.2f}" \
            if share else "a lower rollout.mem_fraction"
        return f"{lower} (SGLang's share of each GPU), or parallel.tp" + (f"={tp}" if tp else "")
    if component.startswith("optimizer"):
        return "more GPUs (the optimizer shards over dp)" + (f", or parallel.tp={tp}" if tp else "")
    knobs = [f"parallel.tp={tp}"] if tp else []
    if d.layers % (cfg.parallel.pp * 2) == 0:
        knobs.append(f"parallel.pp={cfg.parallel.pp * 2}")
    return " or ".join(knobs) or "a bigger GPU (--gpu h200)"


def advise(est, cfg, d: ModelDims) -> list[str]:
    """Warnings of an estimate: it does not fit, naming the knob of the largest component (and of
    the next ones while removing the larger ones alone would still not make it fit)."""
    warnings = []
    if not est.fits:
        excess = est.total_gib - est.usable_gib
        ranked = sorted(est.memory_gib, key=est.memory_gib.get, reverse=True)
        knobs, left = [], excess
        for component in ranked[:3]:
            knobs.append(f"{_knob(component, cfg, d, min(left, est.memory_gib[component]), est)} "
                         f"[{component} {est.memory_gib[component]:.1f} GiB]")
            left -= est.memory_gib[component]
            if left <= 0:
                break
        warnings.append(f"will not fit: {est.total_gib:.1f} GiB > {est.usable_gib:.1f} GiB usable per GPU on "
                        f"{est.rank}; try " + "; then ".join(knobs))
    if cfg.model.attention_backend in ("sdpa", "te") and est.memory_gib.get("attention mask (sdpa)", 0) >= 0.5:
        warnings.append("model.attention_backend=sdpa materialises an s x s mask per layer "
                        f"({est.memory_gib['attention mask (sdpa)']:.1f} GiB here, plus a copy in each layer's "
                        "activations); set model.attention_backend=flex on GPUs")
    return warnings
