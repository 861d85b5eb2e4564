"""Replays: the tokens a sample must produce instead of sampling (benchmarks, tests)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..topology import TagIds, parse_structure


class ReplayMismatch(ValueError):
    """A replayed response the engine cannot reproduce: a token the engine forces (a branch's
    `<step>` + label, a `<takeaway>`) is not the script's, e.g. a sequentially sampled response
    whose branch labels are not 1, 2, ... in order."""


@dataclass
class Script:
    """A replay: the tokens one stream must produce, and for each of its forks one Script per
    branch. Replayed tokens are still scored by the model; forced tokens must match the script."""
    tokens: list[int]
    forks: list[list["Script"]] = field(default_factory=list)
    at: int = 0

    @classmethod
    def from_response(cls, response: list[int], tags: TagIds, max_depth: int = 1) -> "Script":
        ids = list(response)
        structure = parse_structure(ids, tags, 0, max_depth)

        def build(lo, hi, blocks):
            script, cur = cls([]), lo
            for b in blocks:
                script.tokens += ids[cur:b.first_step]
                script.forks.append([build(br.start, br.end, br.blocks) for br in b.branches])
                cur = b.branches[-1].end
            script.tokens += ids[cur:hi]
            return script

        return build(0, len(ids), structure.blocks)

    def next(self) -> int | None:
        if self.at >= len(self.tokens):
            return None
        self.at += 1
        return self.tokens[self.at - 1]
