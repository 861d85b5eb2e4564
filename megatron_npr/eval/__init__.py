"""Evaluation: metrics from rollouts (avg@n, best@n, validity, trigger rate, speedups) and the runner."""
from .common import DataConfig, GraderConfig, ModelConfig, ProblemSet, load_problem_set, open_grader, problem_seed
from .metrics import EvalResult, SampleRecord, check_structure, sample_record, summarize
from .runner import EvalConfig, EvalSamplingConfig, evaluate, measure_decode_speedup, run_eval

__all__ = [
    "DataConfig",
    "EvalConfig",
    "EvalResult",
    "EvalSamplingConfig",
    "GraderConfig",
    "ModelConfig",
    "ProblemSet",
    "SampleRecord",
    "check_structure",
    "evaluate",
    "load_problem_set",
    "measure_decode_speedup",
    "open_grader",
    "problem_seed",
    "run_eval",
    "sample_record",
    "summarize",
]
