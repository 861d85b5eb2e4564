"""Math problems from ORZ-format collections and the benchmark files, as one record type.

ORZ: a JSON list of `[{"from": "human", "value": Q}, {"from": "assistant", "ground_truth": {"value": A}}]`.
Benchmarks (JSON list or JSONL of objects): the question is `question`, `problem`, or the user turn
of a chat-style `prompt` list (`[{"from": "user", "value": Q}]`, the reference's evaluation files);
the answer `answer` or `final_answer` (a number, LaTeX, or for GPQA a letter inside "['D', 'c']");
the id `id`, `problem_idx` or `unique_id` when present.
"""
from __future__ import annotations

import ast
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class ProblemFormatError(ValueError):
    """A record that cannot be read; the message names the file and the record index."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
    source: str

    def to_json(self) -> dict:
        return asdict(self)


def _load_records(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProblemFormatError(f"{path}: cannot read: {e}") from None
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProblemFormatError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, list):
        raise ProblemFormatError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    return data


def _orz_record(record, source: str, index: int) -> Problem:
    if not (isinstance(record, list) and len(record) >= 2 and isinstance(record[0], dict)
            and isinstance(record[1], dict)):
        raise ValueError("expected [human turn, assistant turn]")
    question = record[0].get("value")
    answer = (record[1].get("ground_truth") or {}).get("value")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing human 'value' (the question)")
    if answer is None or not str(answer).strip():
        raise ValueError("missing assistant 'ground_truth.value' (the answer)")
    return Problem(f"{source}-{index}", question.strip(), str(answer).strip(), source)


def _gpqa_letter(answer: str) -> str:
    """GPQA's processed answers look like "['D', 'c']": the first entry is the letter."""
    if answer.startswith("["):
        try:
            answer = str(ast.literal_eval(answer)[0])
        except (ValueError, SyntaxError, IndexError):
            raise ValueError(f"unreadable multiple-choice answer {answer!r}") from None
    return answer.strip().upper()


def _prompt_turn(prompt) -> str | None:
    """The user's text in a chat-style `prompt` list ({"from": "user", "value": Q} or
    {"role": "user", "content": Q}), as the reference's evaluation files write it."""
    if not isinstance(prompt, list):
        return None
    for turn in prompt:
        if isinstance(turn, dict) and (turn.get("from") or turn.get("role")) in ("user", "human"):
            text = turn.get("value", turn.get("content"))
            return text if isinstance(text, str) else None
    return None


def _benchmark_record(record, source: str, index: int) -> Problem:
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, found {type(record).__name__}")
    question = record.get("question", record.get("problem", _prompt_turn(record.get("prompt"))))
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing 'question', 'problem' or a user turn in 'prompt'")
    answer = record.get("answer", record.get("final_answer"))
    if answer is None or not str(answer).strip():
        raise ValueError("missing 'answer' (or 'final_answer')")
    answer = str(answer).strip()
    if "options" in record or "gpqa" in source.lower():
        answer = _gpqa_letter(answer)
    ident = next((str(record[k]) for k in ("id", "problem_idx", "unique_id") if record.get(k) is not None), str(index))
    if not ident.startswith(f"{source}-"):  # a file of Problem.to_json() records keeps its ids
        ident = f"{source}-{ident}"
    return Problem(ident, question.strip(), answer, source)


def load_problems(path: str | Path, *, source: str | None = None, skip_bad: bool = False) -> list[Problem]:
    """Problems of an ORZ collection or a benchmark file (format detected from the records).
    A bad record raises ProblemFormatError naming file and index, or with `skip_bad` is skipped
    and counted in a warning."""
    return read_problems(Path(path), source, skip_bad)[0]


def read_problems(path: Path, source: str | None, skip_bad: bool) -> tuple[list[Problem], list[str]]:
    """(problems, "record i: why" of every skipped record): for callers that treat some bad
    records differently (RL names and skips problems without a gold answer)."""
    source = source or path.stem.split(".")[0]
    records = _load_records(path)
    orz = bool(records) and isinstance(records[0], list)
    parse = _orz_record if orz else _benchmark_record
    problems, skipped = [], []
    for i, record in enumerate(records):
        try:
            problems.append(parse(record, source, i))
        except ValueError as e:
            if not skip_bad:
                raise ProblemFormatError(f"{path}: record {i}: {e}") from None
            skipped.append(f"record {i}: {e}")
    if skipped:
        log.warning("%s: skipped %d bad record(s), first: %s", path, len(skipped), skipped[0])
    return problems, skipped


@dataclass
class ProblemSet:
    problems: list[Problem]
    path: str
    skipped: int = 0  # bad records skipped (skip_bad)
    skipped_first: str | None = None  # "record i: why" of the first one

    def skipped_report(self) -> str | None:
        if not self.skipped:
            return None
        return f"{self.path}: skipped {self.skipped} bad record(s), first: {self.skipped_first}"


def load_problem_set(path: str | Path, *, source: str | None = None, skip_bad: bool = False,
                     limit: int | None = None) -> ProblemSet:
    """load_problems with the skipped-record count kept, the limit applied, and ids checked
    unique (resuming and seeding key on them)."""
    problems, skipped = read_problems(Path(path), source, skip_bad)
    if limit is not None:
        problems = problems[:limit]
    seen: dict[str, int] = {}
    for i, p in enumerate(problems):
        if p.id in seen:
            raise ValueError(f"{path}: problems {seen[p.id]} and {i} share the id {p.id!r}; ids must be unique")
        seen[p.id] = i
    return ProblemSet(problems, str(path), len(skipped), skipped[0] if skipped else None)
