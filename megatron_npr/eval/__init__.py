"""Evaluation: metrics from rollouts (avg@n, best@n, validity, trigger rate, speedups) and the runner."""
from .metrics import EvalResult, SampleRecord, check_structure, sample_record, summarize
from .runner import EvalConfig, evaluate, measure_decode_speedup, run_eval

__all__ = ["EvalConfig", "EvalResult", "SampleRecord", "check_structure", "evaluate", "measure_decode_speedup",
           "run_eval", "sample_record", "summarize"]
