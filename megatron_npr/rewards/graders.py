"""Graders by name: `exact_int` (the synthetic task, in process) or `math` (math-verify in worker
processes). Each is a context manager with `.grade(predictions, golds) -> list[bool]`."""
from __future__ import annotations

from typing import Self

from .math import MathGrader, grade_exact_int


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
        if len(predictions) != len(golds):
            raise ValueError(f"ExactIntGrader.grade: {len(predictions)} predictions but {len(golds)} golds")
        return [grade_exact_int(p, g) for p, g in zip(predictions, golds)]


def grader_kind(kind: str, problems) -> str:
    """`auto` is exact_int when every problem is synthetic, else math."""
    if kind != "auto":
        return kind
    return "exact_int" if problems and all(p.source == "synth" for p in problems) else "math"


def open_grader(section, problems):
    """The grader a `grader:` section (sections.GraderSection) names, for these problems."""
    if grader_kind(section.kind, problems) == "exact_int":
        return ExactIntGrader()
    return MathGrader(workers=section.workers, timeout_s=section.timeout_s)
