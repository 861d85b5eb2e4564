"""Evaluation runner: sample with the engine, grade, score, and time parallel against sequential
decoding of the same responses."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.problems import load_problem_set
from ..data.tokenizer import NPRVocab
from ..io import write_json_atomic
from ..rewards import open_grader
from ..rollout import RolloutBackend, SamplingParams
from ..seeding import problem_seed
from ..sections import DataSection, EngineSection, GraderSection
from .metrics import EvalResult, sample_record, summarize


@dataclass
class EvalConfig:
    engine: EngineSection
    data: DataSection
    sampling: SamplingParams = field(default_factory=SamplingParams)  # n: samples per problem (avg@n, best@n)
    grader: GraderSection = field(default_factory=GraderSection)
    batch_problems: int = 32  # problems per engine.generate call
    measure_speedup: int = 16  # valid parallel responses replayed for the measured speedup (0: off)
    out: str | None = None  # JSON file for the result

    def __post_init__(self):
        if self.batch_problems < 1:
            raise ValueError(f"batch_problems must be >= 1, got {self.batch_problems}")
        if self.measure_speedup < 0:
            raise ValueError(f"measure_speedup must be >= 0, got {self.measure_speedup}")


def evaluate(engine: RolloutBackend, vocab: NPRVocab, problems, params: SamplingParams, grader,
             measure_speedup: int = 16, progress: bool = True, batch_problems: int = 32,
             instruction: str | None = None) -> EvalResult:
    """avg@n, best@n, format validity, trigger rate, branches per block, ideal and measured speedup.

    Each problem is sampled with its own seed (problem_seed), so results do not depend on batching.
    Correctness is graded on the decoded response text whatever its structure. `instruction`
    (default: the NPR instruction) is appended to each question."""
    from tqdm import tqdm

    records, replayable = [], []
    bar = tqdm(total=len(problems), disable=not progress, desc="eval", unit="problem")
    try:
        for start in range(0, len(problems), batch_problems):
            batch = problems[start:start + batch_problems]
            rollouts = _generate(engine, vocab, batch, params, instruction)
            golds = [p.answer for p in batch for _ in range(params.n)]
            correct = grader.grade([vocab.decode(r.token_ids[r.response_start:]) for r in rollouts], golds)
            for j, (rollout, ok) in enumerate(zip(rollouts, correct)):
                record = sample_record(start + j // params.n, rollout, ok, vocab.tags, params.max_depth)
                records.append(record)
                if record.valid and record.branches_per_block and len(replayable) < measure_speedup:
                    replayable.append(rollout)
            bar.update(len(batch))
            bar.set_postfix(acc=f"{sum(r.correct for r in records) / len(records):.3f}")
    finally:
        bar.close()
    result = summarize(records, len(problems), params.n)
    if replayable:
        seq, par, count = measure_decode_speedup(engine, replayable, params)
        result.measured_samples, result.sequential_time_s, result.parallel_time_s = count, seq, par
        result.measured_speedup = seq / par if count and par > 0 else None
    return result


def _generate(engine: RolloutBackend, vocab: NPRVocab, batch, params: SamplingParams, instruction: str | None):
    from ..data.prompts import NPR_INSTRUCTION
    instruction = NPR_INSTRUCTION if instruction is None else instruction
    prompts = [vocab.prompt_ids(p.question, instruction) for p in batch]
    return engine.generate(prompts, params, seeds=[problem_seed(params.seed, p.id) for p in batch])


def _replay_seconds(engine, rollout, params: SamplingParams, parallel: bool) -> float | None:
    """Wall time to decode one known response alone; None if the engine cannot replay it that way
    (a sequentially sampled response may exceed the parallel engine's limits, e.g. max_branches,
    or number its branches otherwise than the labels the engine forces)."""
    from ..rollout import ReplayMismatch

    prompt, response = rollout.token_ids[:rollout.response_start], rollout.token_ids[rollout.response_start:]
    one = dataclasses.replace(params, n=1, parallel=parallel, max_new_tokens=max(params.max_new_tokens, len(response)))
    start = time.perf_counter()
    try:
        out = engine.generate([prompt], one, replay=[response])[0]
    except ReplayMismatch:
        return None
    seconds = time.perf_counter() - start
    if out.finish_reason != "stop" or out.token_ids != rollout.token_ids:
        return None
    return seconds


def measure_decode_speedup(engine, rollouts, params: SamplingParams) -> tuple[float, float, int]:
    """(sequential seconds, parallel seconds, responses timed): each response decoded one prompt
    at a time, both ways, by replay. The first is decoded once untimed to warm the engine up."""
    _replay_seconds(engine, rollouts[0], params, parallel=False)
    _replay_seconds(engine, rollouts[0], params, parallel=True)
    seq_total = par_total = 0.0
    count = 0
    for rollout in rollouts:
        seq = _replay_seconds(engine, rollout, params, parallel=False)
        par = _replay_seconds(engine, rollout, params, parallel=True)
        if seq is None or par is None:
            continue
        seq_total, par_total, count = seq_total + seq, par_total + par, count + 1
    return seq_total, par_total, count


def run_eval(cfg: EvalConfig, engine: RolloutBackend | None = None, vocab: NPRVocab | None = None,
             progress: bool = True) -> EvalResult:
    """Load problems, engine and grader from the config, evaluate, and write `cfg.out` (JSON)."""
    from ..config import config_to_dict

    d = cfg.data
    data = load_problem_set(d.path, source=d.source, skip_bad=d.skip_bad, limit=d.limit)
    if data.skipped and progress:
        print(data.skipped_report())
    vocab = vocab or cfg.engine.vocab()
    engine = engine if engine is not None else cfg.engine.build()
    with open_grader(cfg.grader, data.problems) as grader:
        result = evaluate(engine, vocab, data.problems, cfg.sampling, grader, cfg.measure_speedup, progress,
                          cfg.batch_problems, d.instruction_text())
    if cfg.out:
        report = {"config": config_to_dict(cfg), "result": result.to_json(),
                  "data": {"path": data.path, "problems": len(data.problems), "skipped_records": data.skipped,
                           "skipped_first": data.skipped_first}}
        write_json_atomic(Path(cfg.out), report)
    return result
