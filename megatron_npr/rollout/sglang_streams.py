"""Client-side bookkeeping of `SGLangBackend`'s NPR decoding: the requests, what each stream
contributed, the batching of many samples' requests into one `engine.generate` call per round,
and the torch engine's lockstep token budget reproduced after the fact."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from .sampling import SamplingParams


@dataclass
class Request:
    input_ids: list[int]
    params: dict
    label: str  # names the request in errors
    stops: frozenset[int]


PER_TOKEN = ("tokens", "logprobs", "forced", "positions", "npr_positions", "off_policy")


@dataclass
class Piece:
    """Tokens one stream contributed, in the flattened order of the torch engine's Rollout."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # where SGLang put each token
    npr_positions: list[int] = field(default_factory=list)  # where NPR puts it (build_layout's)
    off_policy: list[bool] = field(default_factory=list)
    reason: str | None = None  # how the sample finished here; None: a branch closed by </step>
    eos_last: bool = False  # ended by an eos, which the torch engine checks before the budget

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, *values) -> None:  # one value per list, in PER_TOKEN order
        for name, x in zip(PER_TOKEN, values):
            getattr(self, name).append(x)

    def take(self, other: "Piece", count: int) -> None:
        for name in PER_TOKEN:
            getattr(self, name).extend(getattr(other, name)[:count])


@dataclass
class Cursor:
    """Where a stream stands: the ids SGLang sees next (`seq`), NPR's next position, its plans."""
    seq: list[int]
    npr_pos: int
    off_policy: bool  # the context holds a causal join
    piece: Piece = field(default_factory=Piece)
    plans: int = 0  # <plan>s since its last <guideline>, as the scheduler counts them

    def push(self, token: int, logprob: float, forced: bool, tags) -> None:
        self.piece.add(token, logprob, forced, len(self.seq), self.npr_pos, self.off_policy and not forced)
        self.seq.append(token)
        self.npr_pos += 1
        self.plans = 0 if token == tags["<guideline>"] else self.plans + (token == tags["<plan>"])

    def finish(self, reason: str, eos: bool = False) -> Piece:
        self.piece.reason, self.piece.eos_last = reason, eos
        return self.piece


@dataclass
class Job:
    """One sample being decoded."""
    name: str
    params: SamplingParams
    blocks: list[int] = field(default_factory=list)
    versions: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


def together(coroutines):
    """Run request coroutines side by side: each round, the requests every live one yields go out
    as one batch, and each gets its answers back. Returns their results in order."""
    results, live = [None] * len(coroutines), {}

    def step(i, co, answers):
        try:
            live[i] = (co, co.send(answers))
        except StopIteration as done:
            results[i] = done.value

    for i, co in enumerate(coroutines):
        step(i, co, None)
    while live:
        order = sorted(live)
        answers = yield [r for i in order for r in live[i][1]]
        at, current = 0, {i: live.pop(i) for i in order}
        for i in order:
            co, requests = current[i]
            step(i, co, answers[at:at + len(requests)])
            at += len(requests)
    return results


def lockstep_cut(branches: Sequence[Piece], budget: int) -> tuple[list[int], str | None, bool]:
    """How many tokens of each branch the torch engine keeps when the sample has `budget` tokens
    left at the fork: first every branch's `<step>` in branch order, then one token per running
    branch per step, last branch first (scheduler.running). Returns (kept, finish reason or None,
    whether that finish was an eos)."""
    kept, used = [0] * len(branches), 0
    for j in range(len(branches)):
        kept[j], used = 1, used + 1
        if used >= budget:
            return kept, "length", False
    t = 1
    while running := [j for j in reversed(range(len(branches))) if t < len(branches[j])]:
        for j in running:
            b, last = branches[j], t == len(branches[j]) - 1
            kept[j], used = t + 1, used + 1
            if last and b.reason and b.eos_last:
                return kept, b.reason, True
            if used >= budget:
                return kept, "length", False
            if last and b.reason:
                return kept, b.reason, False
        t += 1
    return kept, None, False
