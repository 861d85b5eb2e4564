"""Correctness rewards and graders (the format reward lives in megatron_npr.topology)."""
from .graders import ExactIntGrader, grader_kind, open_grader
from .math import MathGrader, extract_answer, grade_exact_int, grade_one

__all__ = ["ExactIntGrader", "MathGrader", "extract_answer", "grade_exact_int", "grade_one", "grader_kind",
           "open_grader"]
