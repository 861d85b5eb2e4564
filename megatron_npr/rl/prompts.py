"""The problems an RL run trains on (`load_rl_problems`), as an endless reproducible stream
(`PromptStream`).

Epoch e is every problem once, in an order drawn from a generator seeded by (seed, e); the stream
is epoch 0, then epoch 1, ... Its whole state is one integer (problems taken so far), so a
resumed run continues exactly and every rank computes the same stream without communicating.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Generic, TypeVar

import torch

from ..data.problems import Problem, ProblemFormatError, read_problems
from ..sections import DataSection
from ..seeding import stream_seed

log = logging.getLogger(__name__)

T = TypeVar("T")


def _no_answer(why: str) -> bool:
    return why.split(": ", 1)[-1].startswith("missing") and "answer" in why  # the readers' wording


def load_rl_problems(data: DataSection, missing_answer: str = "skip") -> tuple[list[Problem], list[str]]:
    """The problems of `data` and the records left out for having no gold answer ("record i:
    why"). Such records are named and skipped (`missing_answer="skip"`) or are an error
    ("error"); any other bad record is an error unless `data.skip_bad`."""
    path = Path(data.path)
    problems, bad = read_problems(path, data.source, skip_bad=True)
    unanswered = [why for why in bad if _no_answer(why)]
    other = [why for why in bad if not _no_answer(why)]
    if other and not data.skip_bad:
        more = f" (and {len(other) - 1} more bad records)" if other[1:] else ""
        raise ProblemFormatError(f"{path}: {other[0]}{more}")
    if unanswered:
        named = ", ".join(why.split(":", 1)[0] for why in unanswered[:20]) + (" ..." if unanswered[20:] else "")
        if missing_answer == "error":
            raise ValueError(f"{path}: {len(unanswered)} problem(s) without a gold answer ({named}); fix the file or "
                             "set rl.missing_answer=skip")
        log.warning("%s: skipping %d problem(s) without a gold answer: %s", path, len(unanswered), named)
    if data.limit is not None:
        problems = problems[:data.limit]
    dup = next((i for i, n in Counter(p.id for p in problems).items() if n > 1), None)
    if dup is not None:
        raise ValueError(f"{path}: several problems share the id {dup!r}; ids must be unique (they seed sampling)")
    if not problems:
        raise ValueError(f"{path}: no problems to train on")
    return problems, unanswered


class PromptStream(Generic[T]):
    def __init__(self, problems: Sequence[T], per_step: int, seed: int):
        if not problems:
            raise ValueError("PromptStream: no problems")
        if per_step < 1:
            raise ValueError(f"PromptStream: per_step must be >= 1, got {per_step}")
        self.problems, self.per_step, self.seed = list(problems), per_step, seed
        self.taken = 0  # problems handed out so far, over all epochs
        self._orders: dict[int, list[int]] = {}

    @property
    def epoch(self) -> int:
        """Epoch of the next problem."""
        return self.taken // len(self.problems)

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if len(self._orders) > 2:  # a batch spans at most a few epochs; keep memory flat
                self._orders.pop(min(self._orders))
            g = torch.Generator().manual_seed(stream_seed(self.seed, 0x5EED, epoch))
            self._orders[epoch] = torch.randperm(len(self.problems), generator=g).tolist()
        return self._orders[epoch]

    def take(self, count: int | None = None) -> list[T]:
        """The next `count` problems (default: per_step)."""
        count = self.per_step if count is None else count
        n, first = len(self.problems), self.taken
        self.taken += count
        return [self.problems[self.epoch_order(g // n)[g % n]] for g in range(first, first + count)]

    def state_dict(self) -> dict:
        return {"taken": self.taken, "seed": self.seed, "problems": len(self.problems)}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["problems"]) != (self.seed, len(self.problems)):
            raise ValueError(f"cannot resume the prompt stream: it was saved for {state['problems']} problems with "
                             f"seed {state['seed']}, this run has {len(self.problems)} with seed {self.seed}")
        self.taken = int(state["taken"])
