"""Correctness rewards (the format reward lives in megatron_npr.topology)."""
from .math import MathGrader, extract_answer, grade_exact_int, grade_one

__all__ = ["MathGrader", "extract_answer", "grade_exact_int", "grade_one"]
