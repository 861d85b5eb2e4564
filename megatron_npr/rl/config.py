"""Typed configuration of `npr rl CONFIG` (stages 1 and 3), loaded with `config.load_config`.

    model:    {hf_dir, tokenizer, dtype, attention_backend}   the Megatron policy
    parallel: {tp, pp}                                         dp = world size / (tp * pp)
    optim:    {lr, min_lr, warmup_steps, schedule, weight_decay, clip_grad, beta1, beta2, eps}
    data:     {path, source, skip_bad, limit, instruction}    the problem file
    grader:   {kind, workers, timeout_s}
    sampling: rollout.SamplingParams (n samples per prompt, temperature, max_new_tokens, ...);
              `parallel` is the algorithm's (DAPO decodes sequentially, PAPO in parallel)
    engine:   {kv_slots, device, dtype, decode_attention}   the rollout engine; its weights come from
              model.hf_dir, then from the trainer after every step
    rollout:  {backend, placement, engines, launch, host, port, weight_backend, flattened, bucket_mb,
               timeout_s, generate_timeout_s, join, tp}   where the engines run (RolloutSection)
    rl:       {algorithm, steps, prompts_per_step, updates_per_batch, clip_*, ...}  (RLSection)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..rollout import SamplingParams
from ..sections import DataSection, DType, EngineSection, GraderSection, ModelSection, OptimSection, ParallelSection
from .algorithms import ALGORITHMS
from .losses import Clip


@dataclass
class RLEngineSection:
    """The rollout engine's own knobs; the model folder is `model.hf_dir`."""
    kv_slots: int = 1 << 16
    device: str = "cpu"
    dtype: DType = "fp32"
    decode_attention: Literal["sdpa", "triton"] = "sdpa"  # the torch engine's; SGLang has its own kernels

    def __post_init__(self):
        if self.kv_slots < 1:
            raise ValueError(f"kv_slots must be >= 1, got {self.kv_slots}")

    def section(self, model: ModelSection) -> EngineSection:
        return EngineSection(model.hf_dir, model.tokenizer, self.dtype, self.kv_slots, self.device,
                             self.decode_attention)


def _is_function_name(text: str) -> bool:
    module, _, name = text.partition(":")
    return all(part.isidentifier() for part in module.split(".")) and name.isidentifier()


@dataclass
class RolloutSection:
    """Where the rollout engines run and how weights reach them (`rl.rollouts.build_backend`)."""
    backend: Literal["torch", "sglang"] = "torch"
    placement: Literal["colocated", "split"] = "colocated"  # in rank 0's process / on engine ranks of their own
    engines: int = 1  # split: engine ranks (requests are spread over them)
    launch: Literal["spawn", "external"] = "spawn"  # split: rank 0 starts them, or the job's launcher does
    host: str = "127.0.0.1"  # split: rank 0's address, where engine ranks connect
    port: int = 0  # split: the control group's port (0: a free one; external launches need a fixed one)
    weight_backend: Literal["gloo", "nccl"] = "gloo"  # the weight group's (nccl for engines on GPUs)
    flattened: bool = True  # one uint8 broadcast per bucket instead of one per tensor
    bucket_mb: int = 512  # weight buckets (trainer.hf_tensors) of at most this many MiB
    timeout_s: float = 600.0  # an engine rank that does not answer a control call in time is named, the step fails
    generate_timeout_s: float = 3600.0  # the same for a rollout batch
    join: Literal["causal", "exact"] = "causal"  # sglang: how a takeaway sees its branches
    tp: int = 1  # sglang: tensor-parallel size of each engine
    mem_fraction: float | None = None  # sglang: mem_fraction_static, its share of each GPU (None: SGLang's)
    engine_factory: str | None = None  # "module:function" building each engine from the RLConfig (custom engines)

    def __post_init__(self):
        checks = {"engines": self.engines >= 1, "port": 0 <= self.port < 65536, "bucket_mb": self.bucket_mb >= 1,
                  "timeout_s": self.timeout_s > 0, "generate_timeout_s": self.generate_timeout_s > 0,
                  "tp": self.tp >= 1}
        checks["mem_fraction"] = self.mem_fraction is None or 0 < self.mem_fraction < 1
        checks["engine_factory"] = self.engine_factory is None or _is_function_name(self.engine_factory)
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid {', '.join(f'rollout.{k}={getattr(self, k)!r}' for k in bad)}")
        if self.placement == "colocated" and self.engines != 1:
            raise ValueError(f"rollout.engines={self.engines} needs rollout.placement=split (a colocated backend "
                             "is one engine in rank 0's process)")
        if self.launch == "external" and self.port == 0:
            raise ValueError("rollout.launch=external needs a fixed rollout.port for the engine ranks to reach")
        if self.join == "exact":
            raise ValueError("rollout.join=exact needs the NPR join plugin for SGLang, which has not run on a GPU "
                             "yet (unvalidated); use rollout.join=causal, or rollout.backend=torch (exact)")


@dataclass
class RLSection:
    out_dir: str  # checkpoints/, metrics.jsonl, curves.png, rollouts/, tensorboard/
    algorithm: Literal["dapo", "papo"] = "dapo"
    steps: int = 1  # RL steps (one batch of groups each)
    prompts_per_step: int = 32  # groups of sampling.n rollouts per step
    updates_per_batch: int = 1  # optimizer steps per batch (mini-batches of groups)
    clip_low: float | None = None  # None: the algorithm's (DAPO 0.2 / 0.28 / 10, PAPO 0.2 / 0.2 / 10)
    clip_high: float | None = None
    clip_dual: float | None = None  # dual-clip constant c (> 1) for negative advantages
    max_generation_rounds: int = 4  # dynamic sampling: generation batches per step at most
    overlong_buffer: int = 0  # DAPO overlong shaping over the last N tokens of max_new_tokens (0: off)
    overlong_factor: float = 1.0
    micro_rows: int = 1  # packed rows per forward/backward
    max_tokens: int = 4096  # packed row length (prompt + response must fit)
    seed: int = 1234
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    dump_rollouts: bool = False  # out_dir/rollouts/step_NNNNN.jsonl: one line per rollout
    export_hf: str | None = None  # HF folder (weights, config, tokenizer) written at the end
    missing_answer: Literal["skip", "error"] = "skip"  # problems without a gold answer

    def __post_init__(self):
        checks = {"steps": self.steps >= 1, "prompts_per_step": self.prompts_per_step >= 1,
                  "updates_per_batch": self.updates_per_batch >= 1,
                  "max_generation_rounds": self.max_generation_rounds >= 1,
                  "overlong_buffer": self.overlong_buffer >= 0, "overlong_factor": self.overlong_factor >= 0,
                  "micro_rows": self.micro_rows >= 1, "max_tokens": self.max_tokens >= 8,
                  "save_every": self.save_every >= 0, "keep_last": self.keep_last >= 1,
                  "clip_low": self.clip_low is None or 0 <= self.clip_low < 1,
                  "clip_high": self.clip_high is None or self.clip_high >= 0,
                  "clip_dual": self.clip_dual is None or self.clip_dual > 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid {', '.join(f'rl.{k}={getattr(self, k)!r}' for k in bad)}")
        if not str(self.out_dir).strip():
            raise ValueError("rl.out_dir must name a folder")

    def clip(self) -> Clip:
        """The clipped loss's ranges: the algorithm's, with the ones this section sets."""
        default = ALGORITHMS[self.algorithm].clip
        return Clip(default.low if self.clip_low is None else self.clip_low,
                    default.high if self.clip_high is None else self.clip_high,
                    default.dual if self.clip_dual is None else self.clip_dual)


@dataclass
class RLConfig:
    model: ModelSection
    data: DataSection
    rl: RLSection
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    grader: GraderSection = field(default_factory=GraderSection)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(n=16, max_new_tokens=1024))
    engine: RLEngineSection = field(default_factory=RLEngineSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)

    def __post_init__(self):
        # the algorithm decides how rollouts are decoded (DESIGN section 1)
        self.sampling = dataclasses.replace(self.sampling, parallel=ALGORITHMS[self.rl.algorithm].parallel)
        if self.rl.max_tokens <= self.sampling.max_new_tokens:
            raise ValueError(f"rl.max_tokens={self.rl.max_tokens} must exceed sampling.max_new_tokens="
                             f"{self.sampling.max_new_tokens} (a packed row holds prompt + response)")
        if self.rl.overlong_buffer >= self.sampling.max_new_tokens:
            raise ValueError(f"rl.overlong_buffer={self.rl.overlong_buffer} must be below sampling.max_new_tokens="
                             f"{self.sampling.max_new_tokens}")
