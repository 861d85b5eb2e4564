"""What an RL step records: the rollouts it drew (`Drawn`), its phase times, its metrics line
(metrics.jsonl / TensorBoard `rl/`), its rollout dump, and the run's summary.

Entropy would need the full logits, which neither the engine's `Rollout.logprobs` nor the
trainer's `token_logprobs` keep: `sampled_nll` (mean -log p of the sampled tokens under the
engine) is reported instead; it tracks the policy's entropy when sampling at temperature 1.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from ..data.problems import Problem
from ..eval.metrics import sample_record, summarize
from ..io import write_jsonl_atomic
from ..rollout import Rollout

PHASES = ("generate", "reward", "train", "sync")


@dataclass
class Drawn:
    """One rollout of a step and what the step decided about it."""
    problem: Problem
    sample: int  # index within its group
    round: int  # generation round of the step that drew it
    seed: int  # its prompt's seed (the engine derives one per sample and branch from it)
    rollout: Rollout
    group: int  # its problem's index among the step's groups
    correct: bool = False
    verdict: str | None = None  # why it is not trained: the algorithm's drop reason, uninformative_group, ...
    format_reason: str | None = None  # first format defect the reward penalised (DAPO)
    reward: float | None = None  # None: dropped before scoring
    trained: bool = False
    advantage: float = 0.0

    @property
    def response(self) -> list[int]:
        return self.rollout.token_ids[self.rollout.response_start:]


def is_logger() -> bool:
    """Global rank 0 writes the run's files (every rank holds the same metrics)."""
    return not dist.is_initialized() or dist.get_rank() == 0


class PhaseClock:
    def __init__(self):
        self.started, self.seconds = time.perf_counter(), Counter()

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def step_metrics(step: int, drawn: list[Drawn], rounds: int, update: dict, clock: PhaseClock, vocab, cfg) -> dict:
    """One metrics.jsonl line. Rollout metrics cover every rollout drawn (dropped ones too);
    reward and advantage metrics the scored and trained ones; update metrics are zero on a
    skipped step (nothing to train on)."""
    depth = cfg.sampling.max_depth
    records = [sample_record(d.group, d.rollout, d.correct, vocab.tags, depth) for d in drawn]
    groups = {d.group for d in drawn}
    ev = summarize(records, len(groups), cfg.sampling.n)
    scored, trained = [d for d in drawn if d.reward is not None], [d for d in drawn if d.trained]
    rewards = [d.reward for d in scored]
    verdicts = Counter(d.verdict for d in drawn if d.verdict is not None)
    sampled = [-lp for d in drawn for lp, f in zip(d.rollout.logprobs, d.rollout.forced_mask) if not f]
    seconds = {p: clock.seconds.get(p, 0.0) for p in PHASES}
    generated = sum(r.response_tokens for r in records)
    metrics = {
        "step": step,
        "reward_mean": _mean(rewards), "reward_std": statistics.pstdev(rewards) if rewards else 0.0,
        "advantage_abs_mean": _mean(abs(d.advantage) for d in trained),
        "accuracy": ev.accuracy, "format_validity": ev.format_validity, "npr_format_rate": ev.npr_format_rate,
        "parallel_trigger_rate": ev.parallel_trigger_rate, "branches_per_block": ev.mean_branches_per_block,
        "response_tokens": ev.mean_response_tokens,
        "critical_path_tokens": _mean(r.critical_path_tokens for r in records if r.critical_path_tokens),
        "ideal_speedup": ev.ideal_speedup, "sampled_nll": _mean(sampled),
        "rollouts": len(drawn), "groups": len(groups), "generation_rounds": rounds,
        "trained_rollouts": len(trained), "trained_groups": len({d.group for d in trained}),
        "groups_uninformative": len({d.group for d in drawn if d.verdict == "uninformative_group"}),
        "groups_surplus": len({d.group for d in drawn if d.verdict == "surplus_group"}),
        "dropped_rollouts": sum(n for v, n in verdicts.items() if not v.endswith("_group")),
        **{f"dropped_{v}": n for v, n in sorted(verdicts.items()) if not v.endswith("_group")},
        "step_skipped": int(not trained),
        "weight_version": max((d.rollout.stats.get("weight_version", 0) for d in drawn), default=0),
        "grad_norm": 0.0, "updates": 0, "mismatch_max": 0.0, "mismatch_mean": 0.0,
        **update,
        **{f"time_{p}_s": s for p, s in seconds.items()},
        "step_time_s": time.perf_counter() - clock.started,
        "generate_tokens_per_s": generated / seconds["generate"] if seconds["generate"] else 0.0,
        "train_tokens_per_s": update.get("train_tokens", 0) / seconds["train"] if seconds["train"] else 0.0,
    }
    return metrics


def dump_rows(drawn: list[Drawn]) -> list[dict]:
    return [{"problem_id": d.problem.id, "group": d.group, "sample": d.sample, "round": d.round, "seed": d.seed,
             "weight_version": d.rollout.stats.get("weight_version", 0), "finish_reason": d.rollout.finish_reason,
             "drop_reason": d.verdict, "format_reason": d.format_reason, "correct": d.correct, "reward": d.reward,
             "advantage": d.advantage, "trained": d.trained, "token_ids": list(d.rollout.token_ids),
             "response_start": d.rollout.response_start} for d in drawn]


def write_rollout_dump(out_dir: Path, step: int, drawn: list[Drawn]) -> Path:
    """out_dir/rollouts/step_NNNNN.jsonl, one line per rollout, written atomically (a re-run of
    the step after a resume replaces it)."""
    return write_jsonl_atomic(Path(out_dir) / "rollouts" / f"step_{step:05d}.jsonl", dump_rows(drawn))


def summary(history: list[dict], cfg, skipped_problems: list[str], weight_version: int) -> dict:
    last = history[-1] if history else {}
    return {"algorithm": cfg.rl.algorithm, "steps": len(history),
            "skipped_steps": sum(r.get("step_skipped", 0) for r in history),
            "final_reward_mean": last.get("reward_mean"), "final_accuracy": last.get("accuracy"),
            "weight_version": weight_version,
            "max_mismatch": max((r.get("mismatch_max", 0.0) for r in history), default=0.0),
            "skipped_problems": skipped_problems}
