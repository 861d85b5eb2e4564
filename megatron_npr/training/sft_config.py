"""Typed configuration of packed parallel SFT (`npr sft CONFIG`), loaded with `config.load_config`.
The model, parallel and optim sections are the shared ones of `megatron_npr.sections`.

    model:    {hf_dir, tokenizer, dtype, attention_backend}
    data:     {path, max_tokens, max_depth, instruction}
    parallel: {tp, pp}                 # dp = world size / (tp * pp)
    optim:    {lr, min_lr, warmup_steps, schedule, weight_decay, clip_grad, beta1, beta2, eps}
    train:    {epochs | steps, global_batch_rows | global_batch_tokens, micro_rows, seed, out_dir,
               save_every, keep_last, log_every, export_hf}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..sections import ModelSection, OptimSection, ParallelSection


@dataclass
class SFTDataSection:
    path: str  # JSONL: rejection-sampling output, or {question|prompt, response|solution} text records
    max_tokens: int = 4096  # packed row length
    max_depth: int = 1
    instruction: Literal["npr", "none"] = "npr"  # what text-form records append to the question

    def __post_init__(self):
        if self.max_tokens < 8:
            raise ValueError(f"max_tokens must be >= 8, got {self.max_tokens}")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")


@dataclass
class TrainSection:
    out_dir: str  # checkpoints/, tensorboard/, metrics.jsonl, loss.png
    epochs: float = 1.0
    steps: int | None = None  # overrides epochs
    global_batch_rows: int | None = None  # rows of max_tokens per optimizer step, over all DP ranks
    global_batch_tokens: int | None = None  # or the same in tokens (rounded up to whole rows)
    micro_rows: int = 1  # rows per forward/backward; the rest is gradient accumulation
    seed: int = 1234
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    log_every: int = 1
    export_hf: str | None = None  # HF folder written at the end

    def __post_init__(self):
        if self.global_batch_rows is not None and self.global_batch_tokens is not None:
            raise ValueError("set global_batch_rows or global_batch_tokens, not both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs <= 0 or self.micro_rows < 1 or self.keep_last < 1 or self.save_every < 0:
            raise ValueError("epochs > 0, micro_rows >= 1, keep_last >= 1 and save_every >= 0 are required")

    def rows_per_step(self, max_tokens: int, dp: int) -> int:
        """Global batch in rows: a multiple of dp * micro_rows, at least one microbatch per rank."""
        quantum = dp * self.micro_rows
        if self.global_batch_tokens is not None:
            rows = -(-self.global_batch_tokens // max_tokens)
        else:
            rows = self.global_batch_rows or quantum
        if rows % quantum:
            raise ValueError(f"train: a global batch of {rows} rows is not a multiple of dp*micro_rows = "
                             f"{dp}*{self.micro_rows}")
        return rows


@dataclass
class SFTConfig:
    model: ModelSection
    data: SFTDataSection
    train: TrainSection
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
