"""What evaluation and rejection sampling share: config sections, model and data loading,
graders, and per-problem seeds."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from ..data.problems import Problem
from ..rollout.sampling import stream_seed

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    hf_dir: str  # HF Qwen3 folder (with the NPR tags in its vocabulary)
    tokenizer: str | None = None  # default: the model folder if it has one, else the bundled Qwen3 tokenizer
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    kv_slots: int = 1 << 16
    device: str = "cpu"

    def __post_init__(self):
        if not str(self.hf_dir).strip():
            raise ValueError("hf_dir must name a model folder")
        if self.kv_slots < 1:
            raise ValueError(f"kv_slots must be >= 1, got {self.kv_slots}")


@dataclass
class DataConfig:
    path: str  # ORZ collection or benchmark file (JSON / JSONL)
    source: str | None = None  # default: the file's stem
    skip_bad: bool = False  # skip unreadable records (counted and reported) instead of failing
    limit: int | None = None  # the first `limit` problems only
    instruction: Literal["npr", "none"] = "npr"  # "none": the question alone (tiny models trained without it)

    def instruction_text(self) -> str:
        from ..data.prompts import instruction_text
        return instruction_text(self.instruction)

    def __post_init__(self):
        if not str(self.path).strip():
            raise ValueError("path must name a problem file")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or null for all), got {self.limit}")


@dataclass
class GraderConfig:
    kind: Literal["auto", "math", "exact_int"] = "auto"  # auto: exact_int when every problem has source "synth"
    workers: int = 2
    timeout_s: int = 5

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.timeout_s < 1:
            raise ValueError(f"timeout_s must be >= 1, got {self.timeout_s}")


# ---------------------------------------------------------------- data
@dataclass
class ProblemSet:
    problems: list[Problem]
    path: str
    skipped: int = 0  # bad records skipped (DataConfig.skip_bad)
    skipped_first: str | None = None  # "record i: why" of the first one

    def skipped_report(self) -> str | None:
        if not self.skipped:
            return None
        return f"{self.path}: skipped {self.skipped} bad record(s), first: {self.skipped_first}"


class _SkipCounter(logging.Handler):
    """Catches load_problems' one warning about skipped records: (path, count, first)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.found: tuple | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if "skipped" in str(record.msg) and isinstance(record.args, tuple) and len(record.args) == 3:
            self.found = record.args


def load_problem_set(data: DataConfig) -> ProblemSet:
    """load_problems with the skipped-record count kept (it only logs it), the limit applied,
    and ids checked unique (resuming and seeding key on them)."""
    from ..data import problems as problems_module

    logger, counter = logging.getLogger(problems_module.__name__), _SkipCounter()
    logger.addHandler(counter)
    try:
        problems = problems_module.load_problems(data.path, source=data.source, skip_bad=data.skip_bad)
    finally:
        logger.removeHandler(counter)
    if data.limit is not None:
        problems = problems[:data.limit]
    seen: dict[str, int] = {}
    for i, p in enumerate(problems):
        if p.id in seen:
            raise ValueError(f"{data.path}: problems {seen[p.id]} and {i} share the id {p.id!r}; ids must be unique")
        seen[p.id] = i
    skipped, first = (counter.found[1], counter.found[2]) if counter.found else (0, None)
    return ProblemSet(problems, str(data.path), skipped, first)


# ---------------------------------------------------------------- model
def load_tokenizer_for(model: ModelConfig):
    """(tokenizer, TagIds) as NPREngine.from_hf picks them."""
    from ..data.tokenizer import load_tokenizer, tokenizer_dir_for
    return load_tokenizer(tokenizer_dir_for(model.hf_dir, model.tokenizer))


def load_engine(model: ModelConfig):
    import torch

    from ..rollout import NPREngine
    return NPREngine.from_hf(model.hf_dir, model.tokenizer, kv_slots=model.kv_slots,
                             dtype=getattr(torch, model.dtype), device=model.device)


def response_text(tokenizer, rollout) -> str:
    """What the grader reads: the engine's response ids decoded (\\boxed is plain text)."""
    return tokenizer.decode(rollout.token_ids[rollout.response_start:], skip_special_tokens=False)


def problem_seed(seed: int, problem_id: str, round_index: int = 0) -> int:
    """A problem's own seed: independent of batching, order and resuming."""
    id_hash = int.from_bytes(hashlib.blake2b(problem_id.encode(), digest_size=8).digest(), "little")
    return stream_seed(seed, id_hash, round_index)


# ---------------------------------------------------------------- graders
class ExactIntGrader:
    """grade_exact_int in this process: plain string work, nothing to isolate in workers
    (MathGrader's grade_fn must also accept max_chars/timeout_s, which grade_exact_int does not)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def grade(self, predictions: list[str], golds: list[str]) -> list[bool]:
        from ..rewards import grade_exact_int
        if len(predictions) != len(golds):
            raise ValueError(f"ExactIntGrader.grade: {len(predictions)} predictions but {len(golds)} golds")
        return [grade_exact_int(p, g) for p, g in zip(predictions, golds)]


def grader_kind(kind: str, problems: list[Problem]) -> str:
    if kind != "auto":
        return kind
    return "exact_int" if problems and all(p.source == "synth" for p in problems) else "math"


def open_grader(cfg: GraderConfig, problems: list[Problem]):
    """A context-managed grader with .grade(predictions, golds) -> list[bool]."""
    if grader_kind(cfg.kind, problems) == "exact_int":
        return ExactIntGrader()
    from ..rewards import MathGrader
    return MathGrader(workers=cfg.workers, timeout_s=cfg.timeout_s)


def write_json_atomic(path: Path, payload: dict) -> None:
    """All or nothing: a temporary file renamed over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
