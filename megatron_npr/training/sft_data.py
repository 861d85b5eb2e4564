"""SFT records (JSONL) -> token ids, loss masks and NPR layouts, ready for topology.pack.

Two record forms, one per line:

* token form (what rejection sampling writes): `prompt_ids`, `response_ids` and optionally
  `forced` (0/1 per response token). These are the engine's own ids and are never re-tokenized.
* text form: `prompt` (chat-templated text) or `question` (raw; the NPR chat prompt is built
  around it), plus `response` or `solution` (the NPR trajectory text). The response is
  canonicalised, encoded, and closed with `<|im_end|>` so the model learns to stop.

Every record is validated with the one topology parser. The loss mask is the response minus the
tokens the parallel engine inserts (each branch's `<step>` + label, each `<takeaway>`): the model
never samples those, so they are never trained. Bad records are dropped and counted, never fatal.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


from ..data.prompts import NPR_INSTRUCTION
from ..data.tokenizer import END_OF_TURN, NPRVocab
from ..topology import PackSample, TopologyError, canonicalize
from .samples import to_sample

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # drop messages kept verbatim in DropStats


@dataclass(frozen=True)
class SFTSample(PackSample):
    """One training document; a PackSample, so topology.pack takes it as it is."""
    line: int = 0  # 1-based line of the source file
    response_start: int = 0  # number of prompt tokens


@dataclass
class DropStats:
    """What load_sft_samples kept and why it dropped the rest."""
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # first few "file:line: reason: message"

    @property
    def dropped(self) -> int:
        return sum(self.reasons.values())

    def add(self, where: str, reason: str, message: str) -> None:
        self.reasons[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}: {message}")

    def summary(self) -> str:
        if not self.reasons:
            return f"kept {self.kept}, dropped 0"
        counts = ", ".join(f"{r} {n}" for r, n in self.reasons.most_common())
        return f"kept {self.kept}, dropped {self.dropped} ({counts})"

    def to_json(self) -> dict:
        return {"kept": self.kept, "dropped": self.dropped, "reasons": dict(self.reasons.most_common()),
                "examples": list(self.examples)}


class _Drop(Exception):
    """A record that cannot be used: `reason` is a DropStats key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# ---------------------------------------------------------------- fields
def _id_list(record: dict, name: str, vocab_size: int) -> list[int]:
    if name not in record:
        raise _Drop("bad_record", f"missing field '{name}'")
    value = record[name]
    if not isinstance(value, list):
        raise _Drop("bad_record", f"field '{name}' must be a list of token ids, got {type(value).__name__}")
    odd = next((t for t in value if not isinstance(t, int) or isinstance(t, bool)), None)
    if odd is not None:
        raise _Drop("bad_record", f"field '{name}' must hold ints only, found {odd!r}")
    bad = next((t for t in value if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise _Drop("bad_record", f"field '{name}' has id {bad} outside the vocabulary [0, {vocab_size})")
    return value


def _forced_flags(record: dict, n: int) -> list[bool] | None:
    value = record.get("forced")
    if value is None:
        return None
    if not isinstance(value, list) or not all(v in (0, 1) for v in value):  # True/False compare equal to 1/0
        raise _Drop("bad_record", "field 'forced' must be a list of 0/1")
    if len(value) != n:
        raise _Drop("bad_record", f"field 'forced' has {len(value)} entries for {n} response tokens")
    return [bool(v) for v in value]


def _text_field(record: dict, *names: str) -> tuple[str, str] | None:
    """(name, value) of the first of `names` present; bad_record when it is not a string."""
    for name in names:
        if name in record and record[name] is not None:
            if not isinstance(record[name], str):
                raise _Drop("bad_record", f"field '{name}' must be a string, got {type(record[name]).__name__}")
            return name, record[name]
    return None


# ---------------------------------------------------------------- record forms
class _Encoder:
    """Record forms -> (prompt ids, response ids, forced flags), with one vocabulary."""

    def __init__(self, vocab: NPRVocab, instruction: str):
        self.vocab, self.tokenizer, self.instruction = vocab, vocab.tokenizer, instruction
        self.vocab_size = len(vocab)

    def token_form(self, record: dict) -> tuple[list[int], list[int], list[bool] | None]:
        prompt = _id_list(record, "prompt_ids", self.vocab_size)
        response = _id_list(record, "response_ids", self.vocab_size)
        return prompt, response, _forced_flags(record, len(response))

    def text_form(self, record: dict) -> tuple[list[int], list[int], None]:
        response = _text_field(record, "response", "solution")
        if response is None:
            raise _Drop("bad_record", "missing field 'response' (or 'solution', or 'prompt_ids'/'response_ids')")
        prompt = self._prompt(record)
        text = response[1]
        if not text.strip():
            raise _Drop("empty_response", f"field '{response[0]}' is empty")
        return prompt, self._response(text), None

    def _prompt(self, record: dict) -> list[int]:
        found = _text_field(record, "prompt", "question")
        if found is None:
            raise _Drop("bad_record", "missing field 'prompt' (chat-templated text) or 'question'")
        name, text = found
        if not text.strip():
            raise _Drop("bad_record", f"field '{name}' is empty")
        if name == "prompt":
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.vocab.prompt_ids(text, self.instruction)

    def _response(self, text: str) -> list[int]:
        if text.rstrip().endswith(END_OF_TURN):
            text = text.rstrip()  # nothing is trained after the end of the turn
        ids = self.tokenizer.encode(canonicalize(text).text, add_special_tokens=False)
        if not ids or ids[-1] != self.vocab.end_of_turn_id:
            ids.append(self.vocab.end_of_turn_id)
        return ids


def _is_token_form(record: dict) -> bool:
    return "prompt_ids" in record or "response_ids" in record


def _sample(record: dict, enc: _Encoder, max_depth: int, max_tokens: int | None, line: int) -> SFTSample:
    """Validate one record and build its sample; raises _Drop."""
    if not isinstance(record, dict):
        raise _Drop("bad_record", f"expected a JSON object, got {type(record).__name__}")
    prompt, response, forced = enc.token_form(record) if _is_token_form(record) else enc.text_form(record)
    if not response:
        raise _Drop("empty_response", "the response has no tokens")
    if not prompt:
        raise _Drop("bad_record", "the prompt has no tokens")
    ids = prompt + response
    if max_tokens is not None and len(ids) > max_tokens:
        raise _Drop("overlong", f"{len(ids)} tokens > max_tokens {max_tokens}")
    try:  # a sequential sample's `forced` is all 0, yet the parallel engine inserts tokens: the
        # mask computed from the structure applies either way
        return to_sample(prompt, response, enc.vocab, max_depth=max_depth, forced=forced, sample_cls=SFTSample,
                         line=line, response_start=len(prompt))
    except TopologyError as e:
        raise _Drop(e.reason, f"token {e.index} (response token {e.index - len(prompt)}): {e.message}") from None


# ---------------------------------------------------------------- files
def load_sft_samples(path, vocab: NPRVocab, *, max_depth: int = 1, max_tokens: int | None = None,
                     instruction: str = NPR_INSTRUCTION) -> tuple[list[SFTSample], DropStats]:
    """Read a JSONL file of SFT records (module docstring). Returns the usable samples in file
    order and the drop statistics; every dropped record is logged with its file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {path} does not exist")
    enc = _Encoder(vocab, instruction)
    samples: list[SFTSample] = []
    stats = DropStats()
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _Drop("bad_json", f"column {e.colno}: {e.msg}") from None
                samples.append(_sample(record, enc, max_depth, max_tokens, line_no))
            except _Drop as d:
                stats.add(f"{path}:{line_no}", d.reason, d.message)
                log.warning("%s:%d: dropped (%s): %s", path, line_no, d.reason, d.message)
    stats.kept = len(samples)
    if stats.dropped:
        log.warning("%s: %s", path, stats.summary())
    return samples, stats
