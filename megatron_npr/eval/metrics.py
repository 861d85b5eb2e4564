"""Evaluation metrics: pure functions from rollouts and their correctness.

Structure is always judged by `topology.parse_structure` on the engine's token ids (never on
re-tokenized text), so a sequentially decoded response and a parallel one are held to the same
grammar. Rejection sampling classifies its samples with the same `check_structure`.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from ..topology import (
    Structure,
    TagIds,
    TopologyError,
    critical_path_length,
    find_defects,
    layout_from_structure,
    parse_structure,
)


def check_structure(rollout, tags: TagIds, max_depth: int = 1,
                    require_block: bool = False) -> tuple[Structure | None, str | None]:
    """(structure, None) for a finished, valid response; else (None, reason). The reason is
    "length" for a truncated sample, else the parser's first defect (a key of topology.REASONS);
    "invalid_structure" only when the engine stopped a sample the parser finds nothing wrong with."""
    r0 = rollout.response_start
    if rollout.finish_reason == "length":
        return None, "length"
    if rollout.finish_reason == "stop":
        try:
            return parse_structure(rollout.token_ids, tags, r0, max_depth, require_block=require_block), None
        except TopologyError as e:
            return None, e.reason
    defects = find_defects(rollout.token_ids, tags, r0, max_depth, require_block=require_block)
    return None, defects[0].reason if defects else "invalid_structure"


@dataclass(frozen=True)
class SampleRecord:
    """What the metrics need of one sample."""
    problem: int  # index of its problem
    correct: bool
    finish_reason: str
    valid: bool  # parses and finished with stop
    defect: str | None  # why it is not valid
    response_tokens: int
    critical_path_tokens: int | None  # valid samples only: decode steps of a parallel engine
    branches_per_block: tuple[int, ...]  # every block, nested ones included


def sample_record(problem: int, rollout, correct: bool, tags: TagIds, max_depth: int = 1) -> SampleRecord:
    structure, defect = check_structure(rollout, tags, max_depth)
    response_tokens = len(rollout.token_ids) - rollout.response_start
    critical, branches = None, tuple(rollout.stats.get("branches_per_block", ()))
    if structure is not None:
        critical = critical_path_length(layout_from_structure(structure, max_depth), rollout.response_start)
        # a sequential decode forks nothing, so its blocks come from the parsed structure
        branches = tuple(len(b.branches) for b in structure.iter_blocks())
    return SampleRecord(problem, bool(correct), rollout.finish_reason, structure is not None, defect,
                        response_tokens, critical, branches)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


@dataclass
class EvalResult:
    problems: int
    samples_per_problem: int
    accuracy: float  # avg@n: mean correctness over all samples
    best_at_n: float  # problems with at least one correct sample
    format_validity: float  # samples that parse and finished with stop
    parallel_trigger_rate: float  # samples with at least one parallel block
    mean_branches_per_block: float
    ideal_speedup: float  # response tokens / critical-path tokens over valid samples
    mean_response_tokens: float
    finish_reasons: dict[str, int] = field(default_factory=dict)
    invalid_reasons: dict[str, int] = field(default_factory=dict)  # why samples are not valid ("length" too)
    measured_samples: int = 0  # responses replayed for the measured speedup
    sequential_time_s: float = 0.0
    parallel_time_s: float = 0.0
    measured_speedup: float | None = None  # sequential / parallel wall time of the same responses
    # valid samples with at least one block: the NPR format that DAPO rewards and PAPO keeps (a
    # plain answer with no block is valid grammar, so format_validity counts it)
    npr_format_rate: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)

    def table(self) -> str:
        measured = "n/a" if self.measured_speedup is None else (
            f"{self.measured_speedup:.2f}x ({self.sequential_time_s:.3f}s seq / {self.parallel_time_s:.3f}s par, "
            f"{self.measured_samples} responses)")
        rows = [
            ("problems x samples", f"{self.problems} x {self.samples_per_problem}"),
            (f"avg@{self.samples_per_problem}", f"{self.accuracy:.4f}"),
            (f"best@{self.samples_per_problem}", f"{self.best_at_n:.4f}"),
            ("format validity", f"{self.format_validity:.4f}"),
            ("NPR format rate", f"{self.npr_format_rate:.4f}"),
            ("parallel trigger rate", f"{self.parallel_trigger_rate:.4f}"),
            ("branches per block", f"{self.mean_branches_per_block:.2f}"),
            ("mean response tokens", f"{self.mean_response_tokens:.1f}"),
            ("ideal speedup", f"{self.ideal_speedup:.2f}x"),
            ("measured speedup", measured),
            ("finish reasons", _counts(self.finish_reasons)),
            ("invalid reasons", _counts(self.invalid_reasons)),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"


def ideal_speedup(records: list[SampleRecord]) -> float:
    valid = [r for r in records if r.valid and r.critical_path_tokens]
    if not valid:
        return 1.0
    return sum(r.response_tokens for r in valid) / sum(r.critical_path_tokens for r in valid)


def best_at_n(records: list[SampleRecord], problems: int) -> float:
    solved = {r.problem for r in records if r.correct}
    return len(solved) / problems if problems else 0.0


def summarize(records: list[SampleRecord], problems: int, samples_per_problem: int) -> EvalResult:
    """Every metric except the measured speedup (the runner times that on the engine)."""
    blocks = [b for r in records for b in r.branches_per_block]
    return EvalResult(
        problems=problems, samples_per_problem=samples_per_problem,
        accuracy=_mean(r.correct for r in records),
        best_at_n=best_at_n(records, problems),
        format_validity=_mean(r.valid for r in records),
        npr_format_rate=_mean(r.valid and bool(r.branches_per_block) for r in records),
        parallel_trigger_rate=_mean(bool(r.branches_per_block) for r in records),
        mean_branches_per_block=_mean(blocks),
        ideal_speedup=ideal_speedup(records),
        mean_response_tokens=_mean(r.response_tokens for r in records),
        finish_reasons=dict(Counter(r.finish_reason for r in records)),
        invalid_reasons=dict(Counter(r.defect for r in records if r.defect is not None)),
    )
