"""Stage-2 rejection sampling: draw up to K samples per problem, keep the first that is both
correct and structurally valid, and write it as an SFT record (the engine's token ids, never
re-tokenized text).

Files: `<out>` holds one accepted record per line; `<out>.done.jsonl` one line per finished problem
(accepted or rejected after K draws, with its per-reason counts); `<out>.stats.json` the totals.
Both JSONL files are appended a whole batch at a time, output first, each flushed and fsynced, so a
restarted run skips finished problems and never writes a record twice. Every problem is sampled
with its own seeds (problem_seed(seed, id, round)), so its draws do not depend on batching or
resuming, and records are written in problem order: a resumed run ends with the same output file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..data.problems import Problem, load_problem_set
from ..data.tokenizer import NPRVocab
from ..eval.metrics import check_structure
from ..io import append_jsonl, write_json_atomic
from ..rewards import open_grader
from ..rollout import RolloutBackend, SamplingParams
from ..seeding import problem_seed
from ..sections import DataSection, EngineSection, GraderSection

log = logging.getLogger(__name__)


@dataclass
class RejectionConfig:
    engine: EngineSection
    data: DataSection
    out: str  # JSONL of accepted records
    # n: draws per problem per engine call (a round); the paper samples stage 2 sequentially
    # (the NPR format, decoded causally)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(n=4, parallel=False))
    max_samples: int = 8  # K: draws per problem before it is rejected
    grader: GraderSection = field(default_factory=GraderSection)
    batch_problems: int = 16  # problems sampled together
    require_block: bool = True  # a response without any parallel block teaches SFT nothing about branching

    def __post_init__(self):
        if not str(self.out).strip():
            raise ValueError("out must name a JSONL file")
        if self.batch_problems < 1:
            raise ValueError(f"batch_problems must be >= 1, got {self.batch_problems}")
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.sampling.n > self.max_samples:
            raise ValueError(f"sampling.n (draws per round) must be <= max_samples={self.max_samples}, "
                             f"got {self.sampling.n}")

    @property
    def rounds(self) -> int:
        return -(-self.max_samples // self.sampling.n)


# ---------------------------------------------------------------- statistics
@dataclass
class RejectionStats:
    problems: int = 0  # in the data (after the limit)
    finished: int = 0  # problems finished, earlier runs included
    accepted: int = 0  # problems with an accepted sample
    resumed: int = 0  # of `finished`, done by earlier runs
    examined: int = 0  # samples judged: each problem's draws up to and including the accepted one
    drawn: int = 0  # samples generated (whole rounds)
    reasons: dict[str, int] = field(default_factory=dict)  # per examined sample: accepted, wrong_answer, ...
    accepted_at: dict[str, int] = field(default_factory=dict)  # draw index of each accepted sample
    skipped_records: int = 0  # bad problem records skipped (data.skip_bad)
    skipped_report: str | None = None

    @property
    def problem_acceptance(self) -> float:
        return self.accepted / self.finished if self.finished else 0.0

    @property
    def sample_acceptance(self) -> float:
        return self.reasons.get("accepted", 0) / self.examined if self.examined else 0.0

    def add(self, done: dict, resumed: bool = False) -> None:
        """Count one finished problem (a sidecar line)."""
        self.finished += 1
        self.resumed += resumed
        self.examined += done["examined"]
        self.drawn += done["drawn"]
        self.reasons = dict(Counter(self.reasons) + Counter(done["counts"]))
        if done["outcome"] == "accepted":
            self.accepted += 1
            key = str(done["sample"])
            self.accepted_at[key] = self.accepted_at.get(key, 0) + 1

    def to_json(self) -> dict:
        return {"problems": self.problems, "finished": self.finished, "accepted": self.accepted,
                "resumed": self.resumed, "examined": self.examined, "drawn": self.drawn,
                "problem_acceptance": self.problem_acceptance, "sample_acceptance": self.sample_acceptance,
                "reasons": dict(sorted(self.reasons.items())),
                "accepted_at": dict(sorted(self.accepted_at.items(), key=lambda kv: int(kv[0]))),
                "skipped_records": self.skipped_records, "skipped_report": self.skipped_report}

    def table(self) -> str:
        rows = [("problems finished", f"{self.finished} / {self.problems} ({self.resumed} from earlier runs)"),
                ("problems accepted", f"{self.accepted} ({self.problem_acceptance:.1%})"),
                ("samples examined", f"{self.examined} (drawn {self.drawn})")]
        rows += [(f"  {reason}", f"{count} ({count / max(self.examined, 1):.1%})")
                 for reason, count in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))]
        if self.skipped_records:
            rows.append(("bad records skipped", str(self.skipped_records)))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# ---------------------------------------------------------------- one batch of problems
@dataclass
class _Attempt:
    """One problem's draws so far."""
    problem: Problem
    prompt: list[int]
    counts: Counter = field(default_factory=Counter)
    examined: int = 0
    drawn: int = 0
    record: dict | None = None

    def done_line(self) -> dict:
        return {"id": self.problem.id, "outcome": "accepted" if self.record else "rejected",
                "sample": self.record["sample"] if self.record else None, "examined": self.examined,
                "drawn": self.drawn, "counts": dict(sorted(self.counts.items()))}


def judge(rollouts, golds: list[str], vocab: NPRVocab, grader, max_depth: int, require_block: bool) -> list[str]:
    """Verdict of each rollout: accepted, wrong_answer, length, or its first structural defect.
    Structure is checked on the token ids (a sequential decode only gets a causal layout); only
    valid samples are graded, on their decoded text."""
    from ..topology import TopologyError, inserted_mask_from_structure

    verdicts, to_grade = [], []
    for i, rollout in enumerate(rollouts):
        structure, reason = check_structure(rollout, vocab.tags, max_depth, require_block)
        if structure is not None:
            try:  # a sequential sample must also be what the parallel engine would write (labels)
                inserted_mask_from_structure(rollout.token_ids, structure, vocab.label_ids)
            except TopologyError as e:
                reason = e.reason
        verdicts.append(reason)
        if reason is None:
            to_grade.append(i)
    correct = grader.grade([_response_text(vocab, rollouts[i]) for i in to_grade], [golds[i] for i in to_grade])
    for i, ok in zip(to_grade, correct):
        verdicts[i] = "accepted" if ok else "wrong_answer"
    return verdicts


def _response_text(vocab: NPRVocab, rollout) -> str:
    return vocab.decode(rollout.token_ids[rollout.response_start:])


def _record(problem, rollout, vocab: NPRVocab, sample: int, parallel: bool) -> dict:
    r0 = rollout.response_start
    return {"id": problem.id, "source": problem.source, "question": problem.question, "answer": problem.answer,
            "prompt_ids": list(rollout.token_ids[:r0]), "response_ids": list(rollout.token_ids[r0:]),
            "forced": [int(bool(f)) for f in rollout.forced_mask], "response": _response_text(vocab, rollout),
            "sample": sample, "parallel": parallel}


def sample_batch(engine: RolloutBackend, vocab: NPRVocab, grader, problems, cfg: RejectionConfig) -> list[_Attempt]:
    """Rounds of sampling.n draws until each problem has an accepted sample or K draws."""
    s = cfg.sampling
    instruction = cfg.data.instruction_text()
    attempts = [_Attempt(p, vocab.prompt_ids(p.question, instruction)) for p in problems]
    active = list(attempts)
    for round_index in range(cfg.rounds):
        if not active:
            break
        first = round_index * s.n
        n = min(s.n, cfg.max_samples - first)
        rollouts = engine.generate([a.prompt for a in active], dataclasses.replace(s, n=n),
                                   seeds=[problem_seed(s.seed, a.problem.id, round_index) for a in active])
        golds = [a.problem.answer for a in active for _ in range(n)]
        verdicts = judge(rollouts, golds, vocab, grader, s.max_depth, cfg.require_block)
        for i, attempt in enumerate(active):
            attempt.drawn += n
            for k in range(n):  # sample order: the first accepted draw wins
                verdict = verdicts[i * n + k]
                attempt.examined += 1
                attempt.counts[verdict] += 1
                if verdict == "accepted":
                    attempt.record = _record(attempt.problem, rollouts[i * n + k], vocab, first + k, s.parallel)
                    break
        active = [a for a in active if a.record is None]
    return attempts


# ---------------------------------------------------------------- files and resuming
def _paths(out: str | Path) -> tuple[Path, Path, Path]:
    out = Path(out)
    return out, Path(f"{out}.done.jsonl"), Path(f"{out}.stats.json")


def _read_jsonl(path: Path) -> list[dict]:
    """Lines of a JSONL file; a partial last line (a process killed mid-write) is cut off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run", path, len(data) - keep)
        with path.open("r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number}: invalid JSON ({e.msg}); "
                             "fix or remove the line to resume") from None
    return rows


def load_finished(out: str | Path) -> tuple[dict[str, dict], list[dict]]:
    """(id -> sidecar line of every finished problem, sidecar lines to add). An output record
    without a sidecar line (the run died between the two writes) counts as finished: its
    rejected draws before the accepted one are counted as "unrecorded"."""
    out_path, done_path, _ = _paths(out)
    written: dict[str, dict] = {}
    for number, record in enumerate(_read_jsonl(out_path), 1):
        if record.get("id") in written:
            raise ValueError(f"{out_path}: line {number}: duplicate record for problem {record.get('id')!r}")
        written[record.get("id")] = record
    finished = {line["id"]: line for line in _read_jsonl(done_path)}
    missing = []
    for problem_id, line in list(finished.items()):
        if line["outcome"] == "accepted" and problem_id not in written:
            log.warning("%s: problem %r is marked accepted but has no record; sampling it again", done_path, problem_id)
            del finished[problem_id]
    for problem_id, record in written.items():
        if problem_id not in finished:
            sample = int(record["sample"])
            line = {"id": problem_id, "outcome": "accepted", "sample": sample, "examined": sample + 1,
                    "drawn": sample + 1, "counts": {"accepted": 1, **({"unrecorded": sample} if sample else {})},
                    "recovered": True}
            finished[problem_id] = line
            missing.append(line)
    return finished, missing


# ---------------------------------------------------------------- the run
def run_rejection_sampling(cfg: RejectionConfig, engine: RolloutBackend | None = None, vocab: NPRVocab | None = None,
                           progress: bool = True) -> RejectionStats:
    """Sample, filter and write every unfinished problem; returns (and writes) the totals."""
    from tqdm import tqdm

    d = cfg.data
    data = load_problem_set(d.path, source=d.source, skip_bad=d.skip_bad, limit=d.limit)
    stats = RejectionStats(problems=len(data.problems), skipped_records=data.skipped,
                           skipped_report=data.skipped_report())
    if data.skipped:
        log.warning("%s", stats.skipped_report)
    out_path, done_path, stats_path = _paths(cfg.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    finished, recovered = load_finished(out_path)
    known = {p.id for p in data.problems}
    for line in finished.values():
        if line["id"] in known:
            stats.add(line, resumed=True)
    pending = [p for p in data.problems if p.id not in finished]
    if pending and vocab is None:
        vocab = cfg.engine.vocab()
    if pending and engine is None:
        engine = cfg.engine.build()
    with open_grader(cfg.grader, data.problems) as grader, out_path.open("a", encoding="utf-8") as out_f, \
            done_path.open("a", encoding="utf-8") as done_f, \
            tqdm(total=len(data.problems), initial=stats.finished, disable=not progress, desc="rejection",
                 unit="problem") as bar:
        append_jsonl(done_f, recovered)
        for start in range(0, len(pending), cfg.batch_problems):
            attempts = sample_batch(engine, vocab, grader, pending[start:start + cfg.batch_problems], cfg)
            append_jsonl(out_f, [a.record for a in attempts if a.record])  # the record first: it wins on a crash
            append_jsonl(done_f, [a.done_line() for a in attempts])
            for attempt in attempts:
                stats.add(attempt.done_line())
            bar.update(len(attempts))
            bar.set_postfix(accepted=f"{stats.problem_acceptance:.1%}")
    write_json_atomic(stats_path, stats.to_json())
    return stats
