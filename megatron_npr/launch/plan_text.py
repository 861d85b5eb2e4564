"""The resolved plan of a launch: hosts, ranks, TP/PP/DP, engines per node and their memory share,
paths, the resume point and (with `--dry-run`) the `npr plan` estimate. Printed, and saved as
plan.json in the job's log folder."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import write_json_atomic
from .cluster import ClusterSettings
from .paths import missing_paths, stage_paths
from .slurm import Allocation, engine_layout

CONFIG_CLASSES = {"sft": ("megatron_npr.training.sft_config", "SFTConfig"),
                  "rl": ("megatron_npr.rl.config", "RLConfig"),
                  "sample": ("megatron_npr.training.rejection", "RejectionConfig"),
                  "eval": ("megatron_npr.eval.runner", "EvalConfig")}


@dataclass
class LaunchPlan:
    stage: str
    rank_args: list[str]  # what every rank (and engine) runs: CONFIG + overrides, or convert's arguments
    job: str
    attempt: int
    hosts: list[str]
    gpus_per_node: int
    master: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    engines: int = 0  # engine processes the launcher starts (RL, rollout.launch=external)
    engines_per_node: int = 0
    engine_note: str = ""
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    resume_step: int | None = None
    log_dir: str = ""
    estimate: dict | None = None
    estimate_lines: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> int:
        return len(self.hosts) * self.gpus_per_node if self.stage in ("sft", "rl") else 1

    def text(self) -> str:
        g = self.gpus_per_node
        lines = [f"npr launch {self.stage} {' '.join(self.rank_args)}",
                 f"  job          {self.job}, attempt {self.attempt}",
                 f"  hosts        {len(self.hosts)} x {g} GPUs, master {self.master}",
                 f"  ranks        {self.ranks}" + (f" = tp {self.tp} x pp {self.pp} x dp {self.dp}"
                                                   if self.ranks > 1 else " (one task on the first host)")]
        for i, host in enumerate(self.hosts if self.ranks > 1 else self.hosts[:1]):
            ranks = f"ranks {i * g}-{i * g + g - 1}" if self.ranks > 1 else "rank 0"
            engines = self._engines_on(i)
            lines.append(f"    {host:<14} {ranks}" + (f", engine rank{'s' if len(engines) > 1 else ''} "
                                                     f"{','.join(map(str, engines))}" if engines else ""))
        if self.engine_note:
            lines.append(f"  engines      {self.engine_note}")
        lines.append(f"  logs         {self.log_dir}/ (launcher.log, node-<host>.log"
                     + (", engines-<host>.log)" if self.engines else ")"))
        for key, path in self.inputs:
            lines.append(f"  input        {key} = {path}" + ("   [MISSING here]" if (key, path) in self.missing
                                                               else ""))
        for key, path in self.outputs:
            lines.append(f"  output       {key} = {path}")
        lines.append("  resume       " + (f"from step {self.resume_step} (the newest checkpoint)"
                                          if self.resume_step else "none: a fresh start"))
        lines += ["  estimate     " + line for line in self.estimate_lines]
        return "\n".join(lines)

    def _engines_on(self, node: int) -> list[int]:
        if not self.engines_per_node:
            return []
        first = node * self.engines_per_node + 1
        return [r for r in range(first, first + self.engines_per_node) if r <= self.engines]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, json.loads(json.dumps(asdict(self), default=str)), sort_keys=False)


def load_stage_config(stage: str, args: list[str]):
    import importlib

    from ..config import load_config
    if stage == "convert":
        return None
    if not args:
        raise ValueError(f"npr launch {stage}: give the config file (and key=value overrides)")
    module, name = CONFIG_CLASSES[stage]
    return load_config(getattr(importlib.import_module(module), name), args[0], args[1:])


def build_plan(stage: str, args: list[str], alloc: Allocation, settings: ClusterSettings, *, gpu: str = "h100",
               model: str | None = None, estimate: bool = False) -> LaunchPlan:
    """The plan of `stage` on `alloc`; the config is loaded (and validated) here, once."""
    args = list(args)
    cfg = load_stage_config(stage, args)
    plan = LaunchPlan(stage, args, alloc.log_name, alloc.restart_count + 1, alloc.hosts, alloc.gpus_per_node,
                      f"{alloc.master_addr}:{alloc.master_port(settings)}",
                      log_dir=str(Path(settings.runs_dir) / alloc.log_name))
    if stage == "rl":
        cfg = _place_engines(plan, cfg, alloc, settings)
    if stage in ("sft", "rl"):
        _layout(plan, cfg, alloc)
        plan.resume_step = _resume_step(cfg)
    plan.inputs, plan.outputs = stage_paths(stage, cfg, args)
    plan.missing = missing_paths(plan.inputs, plan.outputs)
    if estimate and stage in ("sft", "rl"):
        _add_estimate(plan, cfg, alloc, gpu, model)
    return plan


def _layout(plan: LaunchPlan, cfg, alloc: Allocation) -> None:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if alloc.world_size % (tp * pp):
        raise ValueError(f"{alloc.nodes} nodes x {alloc.gpus_per_node} GPUs = {alloc.world_size} ranks is not a "
                         f"multiple of parallel.tp x parallel.pp = {tp} x {pp}")
    plan.tp, plan.pp, plan.dp = tp, pp, alloc.world_size // (tp * pp)


def _place_engines(plan: LaunchPlan, cfg, alloc: Allocation, settings: ClusterSettings):
    """External engines: spread over the nodes, told where rank 0 listens (the first host, the
    job's engine port); the overrides go to every rank and engine."""
    r = cfg.rollout
    share = (f", SGLang mem_fraction_static {r.mem_fraction} of each GPU it shares with the trainer"
             if r.backend == "sglang" and r.mem_fraction else "")
    if r.placement == "colocated":
        plan.engine_note = f"1 {r.backend} engine in global rank 0's process (colocated){share}"
        return cfg
    if r.launch == "spawn":
        plan.engine_note = f"{r.engines} {r.backend} engine processes spawned by rank 0 on {alloc.master_addr}"
        return cfg
    nodes, per_node = engine_layout(r.engines, alloc.nodes)
    plan.engines, plan.engines_per_node = r.engines, per_node
    if not any(a.startswith("rollout.port=") for a in plan.rank_args[1:]):
        plan.rank_args.append(f"rollout.port={alloc.engine_port(settings)}")
    plan.rank_args.append(f"rollout.host={alloc.master_addr}")
    cfg = load_stage_config("rl", plan.rank_args)
    plan.engine_note = (f"{r.engines} {r.backend} engine process{'es' if r.engines > 1 else ''} (tp {r.tp}), "
                        f"{per_node} per node on {nodes} node{'s' if nodes > 1 else ''}, sharing the GPUs; "
                        f"control at {cfg.rollout.host}:{cfg.rollout.port}{share}")
    return cfg


def _resume_step(cfg) -> int | None:
    from ..training.checkpointing import latest_step
    out = cfg.rl.out_dir if hasattr(cfg, "rl") else cfg.train.out_dir
    try:
        return latest_step(Path(out) / "checkpoints")
    except (OSError, RuntimeError):
        return None


def _add_estimate(plan: LaunchPlan, cfg, alloc: Allocation, gpu: str, model: str | None) -> None:
    """The `npr plan` estimate for this allocation; a reason instead when it cannot be made."""
    try:
        from .estimate import estimate, resolve_model_config
        est = estimate(cfg, alloc.nodes, alloc.gpus_per_node, gpu=gpu,
                       model_config=resolve_model_config(cfg, model))
    except Exception as e:  # noqa: BLE001 - the plan is still useful without it
        plan.estimate_lines = [f"unavailable: {e}"]
        return
    plan.estimate, plan.estimate_lines = est.to_json(), est.lines()
