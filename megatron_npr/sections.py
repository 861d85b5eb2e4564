"""Config sections shared by every stage, declared once (YAML keys map onto these dataclasses).

    model:    {hf_dir, tokenizer, dtype, attention_backend}      the Megatron model a stage trains
    parallel: {tp, pp, recompute}                               dp = world size / (tp * pp)
    optim:    {lr, min_lr, warmup_steps, schedule, weight_decay, clip_grad, beta1, beta2, eps}
    engine:   {hf_dir, tokenizer, dtype, kv_slots, device,      the rollout engine a stage samples from
               decode_attention}
    data:     {path, source, skip_bad, limit, instruction}     a problem file (ORZ or benchmark)
    grader:   {kind, workers, timeout_s}

One dtype vocabulary everywhere: `auto` (bf16 on a GPU, fp32 on a CPU), `fp32`, `bf16`, `fp16`.
The `sampling:` section of a stage is `rollout.SamplingParams` itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

DType = Literal["auto", "fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str, device: str | None = None) -> torch.dtype:
    """The torch dtype of a config dtype name; `auto` is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        on_gpu = device.startswith("cuda") if device else torch.cuda.is_available()
        return torch.bfloat16 if on_gpu else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class ModelSection:
    hf_dir: str  # HF Qwen3 folder the weights start from (the tags must be in its vocabulary)
    tokenizer: str | None = None  # default: the model folder's tokenizer, else the bundled Qwen3 one
    dtype: DType = "auto"
    attention_backend: Literal["sdpa", "flex", "triton", "te"] = "sdpa"

    def __post_init__(self):
        if not str(self.hf_dir).strip():
            raise ValueError("hf_dir must name a model folder")

    def vocab(self):
        """The model's NPRVocab (data.tokenizer.load_vocab)."""
        from .data.tokenizer import load_vocab
        return load_vocab(self.hf_dir, self.tokenizer)


RECOMPUTE = ("none", "full")


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    # "full": keep only each layer's input and recompute the layer in backward (Megatron's full,
    # uniform, one layer per chunk): activation memory of one layer instead of all, ~1/3 more compute
    recompute: Literal["none", "full"] = "none"

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"parallel.recompute must be one of {list(RECOMPUTE)}, got {self.recompute!r}")


@dataclass
class OptimSection:
    lr: float = 1e-6
    min_lr: float = 5e-7
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self):
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} > lr {self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("warmup_steps, weight_decay and clip_grad must be >= 0")


@dataclass
class EngineSection:
    hf_dir: str  # HF Qwen3 folder (with the NPR tags in its vocabulary)
    tokenizer: str | None = None  # default: the model folder if it has one, else the bundled Qwen3 tokenizer
    dtype: DType = "fp32"
    kv_slots: int = 1 << 16
    device: str = "cpu"
    decode_attention: Literal["sdpa", "triton"] = "sdpa"  # triton: the split-K decode kernel (a GPU's)

    def __post_init__(self):
        if not str(self.hf_dir).strip():
            raise ValueError("hf_dir must name a model folder")
        if self.kv_slots < 1:
            raise ValueError(f"kv_slots must be >= 1, got {self.kv_slots}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype, self.device)

    def vocab(self):
        """The engine model's NPRVocab (data.tokenizer.load_vocab)."""
        from .data.tokenizer import load_vocab
        return load_vocab(self.hf_dir, self.tokenizer)

    def build(self):
        """The torch rollout engine this section describes (a rollout.RolloutBackend)."""
        from .rollout import NPREngine
        return NPREngine.from_hf(self.hf_dir, self.tokenizer, kv_slots=self.kv_slots, dtype=self.torch_dtype,
                                 device=self.device, decode_attention=self.decode_attention)


@dataclass
class DataSection:
    path: str  # ORZ collection or benchmark file (JSON / JSONL)
    source: str | None = None  # default: the file's stem
    skip_bad: bool = False  # skip unreadable records (counted and reported) instead of failing
    limit: int | None = None  # the first `limit` problems only
    instruction: Literal["npr", "none"] = "npr"  # "none": the question alone (tiny models trained without it)

    def __post_init__(self):
        if not str(self.path).strip():
            raise ValueError("path must name a problem file")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or null for all), got {self.limit}")

    def instruction_text(self) -> str:
        from .data.prompts import instruction_text
        return instruction_text(self.instruction)


@dataclass
class GraderSection:
    kind: Literal["auto", "math", "exact_int"] = "auto"  # auto: exact_int when every problem has source "synth"
    workers: int = 2
    timeout_s: int = 5

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.timeout_s < 1:
            raise ValueError(f"timeout_s must be >= 1, got {self.timeout_s}")
