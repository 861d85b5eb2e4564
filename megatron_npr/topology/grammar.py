"""The NPR branch grammar: one parser, strict (raise at the first defect) or collecting.

    response  := text? block (ws? block)* text?            (at least one block: require_block)
    block     := <guideline> (<plan> text </plan> | ws)+ </guideline> ws?
                 branch+ <takeaway> text </takeaway>         (#branches == #plans)
    branch    := <step> (text | block)+ </step>              (a block inside = nesting)

Nothing may stand between `</step>` and the next `<step>` / `<takeaway>`: the engine never
produces tokens there. Both modes run the same code; `defect()` is the only place they differ,
so the first collected defect is always the error the strict mode raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from .tags import KIND_TAGS, Kind, TagIds

MAX_SUPPORTED_DEPTH = 16

# reason -> what it means (documentation, and the set of valid reasons)
REASONS: dict[str, str] = {
    "tag_outside_block": "a plan/step/takeaway tag, or a closing tag, where no block is open",
    "unexpected_tag": "a tag inside a block where the grammar does not allow it",
    "text_in_guideline": "text inside <guideline> that is not inside a <plan>",
    "no_plans": "a <guideline> without any <plan>",
    "empty_plan": "a <plan> with no text",
    "missing_branch": "</guideline> not followed by <step>",
    "empty_branch": "a <step> with no text and no nested block",
    "text_between_branches": "tokens between </step> and the next <step> or <takeaway>",
    "steps_plans_mismatch": "the number of <step> branches differs from the number of plans",
    "missing_takeaway": "a block's branches not followed by <takeaway>",
    "empty_takeaway": "a <takeaway> with no text",
    "unclosed_block": "the sequence ends inside a guideline, plan, step or takeaway",
    "nesting_too_deep": "a block nested deeper than max_depth",
    "text_between_blocks": "text between a </takeaway> and the next <guideline>",
    "missing_block": "no parallel block at all (only when a block is required)",
    "branch_label": "a <step> not followed by exactly the label the engine inserts for it "
                    "(branch_label(j) for branch j; checked by topology.engine_inserted_mask)",
}


class TopologyError(ValueError):
    """An invalid NPR structure: `.reason` (a key of REASONS) and the offending token `.index`."""

    def __init__(self, reason: str, index: int, message: str = ""):
        self.reason, self.index, self.message = reason, index, message
        super().__init__(f"{reason} at token {index}: {message}" if message else f"{reason} at token {index}")


@dataclass(frozen=True)
class Defect:
    reason: str
    index: int
    message: str


@dataclass(frozen=True)
class Branch:
    start: int  # index of <step>
    end: int  # one past </step>
    blocks: tuple["Block", ...] = ()  # nested blocks


@dataclass(frozen=True)
class Block:
    start: int  # index of <guideline>
    guideline_end: int  # one past </guideline>
    plans: tuple[tuple[int, int], ...]  # [<plan>, one past </plan>)
    branches: tuple[Branch, ...]
    takeaway: tuple[int, int]  # [<takeaway>, one past </takeaway>)
    depth: int  # 0 = top level

    @property
    def first_step(self) -> int:
        return self.branches[0].start

    @property
    def end(self) -> int:
        return self.takeaway[1]


@dataclass(frozen=True)
class Structure:
    blocks: tuple[Block, ...]  # top-level blocks, i.e. rounds
    num_tokens: int
    response_start: int

    @property
    def rounds(self) -> int:
        return len(self.blocks)

    def iter_blocks(self) -> Iterator[Block]:
        """All blocks, outer before inner, in token order."""
        stack = list(reversed(self.blocks))
        while stack:
            b = stack.pop()
            yield b
            for br in reversed(b.branches):
                stack.extend(reversed(br.blocks))

    @property
    def depth(self) -> int:
        """Deepest nesting present: 0 without blocks, 1 for flat blocks."""
        return max((b.depth + 1 for b in self.iter_blocks()), default=0)


def _name(kind: Kind) -> str:
    return KIND_TAGS.get(kind, kind.name.lower())


class _Parser:
    def __init__(self, kinds: Sequence[Kind], max_depth: int, strict: bool):
        self.k, self.n = kinds, len(kinds)
        self.max_depth, self.strict = max_depth, strict
        self.defects: list[Defect] = []

    def defect(self, reason: str, index: int, message: str) -> None:
        if self.strict:
            raise TopologyError(reason, index, message)
        self.defects.append(Defect(reason, index, message))

    def seq(self, i: int, depth: int, in_step: bool) -> tuple[int, tuple[Block, ...], bool]:
        """Free text with blocks, up to the end (top level) or the `</step>` closing a branch."""
        k, n = self.k, self.n
        blocks: list[Block] = []
        saw_text, text_after_block = False, None
        while i < n:
            kind = k[i]
            if kind == Kind.TEXT:
                saw_text = True
                if blocks and text_after_block is None:
                    text_after_block = i
                i += 1
            elif kind == Kind.SPACE:
                i += 1
            elif kind == Kind.GUIDE_O and depth <= self.max_depth:
                if text_after_block is not None:
                    self.defect("text_between_blocks", text_after_block,
                                "text between </takeaway> and the next <guideline>")
                    text_after_block = None
                i, block = self.block(i, depth)
                blocks.append(block)
            elif kind == Kind.STEP_C and in_step:
                break
            else:
                where = "inside a branch" if in_step else "outside any block"
                self.defect("unexpected_tag" if in_step else "tag_outside_block", i,
                            f"{_name(kind)} {where}")
                i += 1
        return i, tuple(blocks), saw_text

    def block(self, start: int, depth: int) -> tuple[int, Block]:
        k, n = self.k, self.n
        if depth >= self.max_depth:
            self.defect("nesting_too_deep", start, f"block at depth {depth + 1} > max_depth {self.max_depth}")
        i, plans = self.guideline(start)
        guideline_end = i
        if not plans:
            self.defect("no_plans", start, "<guideline> without any <plan>")
        while i < n and k[i] == Kind.SPACE:
            i += 1

        def partial(i, branches, takeaway=None):
            return i, Block(start, guideline_end, tuple(plans), tuple(branches), takeaway or (i, i), depth)

        if i >= n:
            self.defect("unclosed_block", start, "sequence ends before the block's <step>")
            return partial(n, [])
        if k[i] != Kind.STEP_O:
            self.defect("missing_branch", i, f"expected <step> after </guideline>, found {_name(k[i])}")
            while i < n and k[i] in (Kind.TEXT, Kind.SPACE):
                i += 1
        branches: list[Branch] = []
        while i < n and k[i] == Kind.STEP_O:
            if plans and len(branches) == len(plans):
                self.defect("steps_plans_mismatch", i, f"branch {len(branches) + 1} but {len(plans)} plan(s)")
            i, branch = self.branch(i, depth)
            branches.append(branch)
            j = i
            while j < n and k[j] in (Kind.TEXT, Kind.SPACE):
                j += 1
            if j > i and j < n and k[j] in (Kind.STEP_O, Kind.TAKE_O):
                self.defect("text_between_branches", i, f"{j - i} token(s) after </step>")
                i = j
        if i >= n:
            self.defect("unclosed_block", start, "sequence ends before the block's <takeaway>")
            return partial(n, branches)
        if k[i] != Kind.TAKE_O:
            if branches:
                self.defect("missing_takeaway", i, f"expected <takeaway> after </step>, found {_name(k[i])}")
            return partial(i, branches)
        if plans and branches and len(branches) < len(plans):  # known only once <takeaway> comes
            self.defect("steps_plans_mismatch", i, f"{len(branches)} branch(es) for {len(plans)} plans")
        end = self.text_span(i, Kind.TAKE_C, (Kind.GUIDE_O,), "empty_takeaway")
        return partial(end, branches, (i, end))

    def guideline(self, start: int) -> tuple[int, list[tuple[int, int]]]:
        k, n = self.k, self.n
        plans: list[tuple[int, int]] = []
        flagged_text = False
        i = start + 1
        while i < n:
            kind = k[i]
            if kind == Kind.PLAN_O:
                end = self.text_span(i, Kind.PLAN_C, (Kind.PLAN_O, Kind.GUIDE_C, Kind.STEP_O, Kind.TAKE_O),
                                     "empty_plan")
                plans.append((i, end))
                i = end
            elif kind == Kind.GUIDE_C:
                return i + 1, plans
            elif kind == Kind.SPACE:
                i += 1
            elif kind == Kind.TEXT:
                if not flagged_text:
                    self.defect("text_in_guideline", i, "text outside <plan> inside <guideline>")
                    flagged_text = True
                i += 1
            elif kind in (Kind.STEP_O, Kind.TAKE_O):  # </guideline> missing: recover as if present
                self.defect("unexpected_tag", i, f"{_name(kind)} inside <guideline> (missing </guideline>?)")
                return i, plans
            else:
                self.defect("unexpected_tag", i, f"{_name(kind)} inside <guideline>")
                i += 1
        self.defect("unclosed_block", start, "<guideline> is never closed")
        return n, plans

    def text_span(self, start: int, close: Kind, ends_early: tuple[Kind, ...], empty_reason: str) -> int:
        """A plan or takeaway: text up to its closing tag; returns one past it. A tag in
        `ends_early` means the closing tag is missing: the span ends there, unconsumed."""
        k, n = self.k, self.n
        name = _name(k[start])
        has_text, i = False, start + 1
        while i < n and k[i] != close:
            kind = k[i]
            if kind == Kind.TEXT:
                has_text = True
            elif kind in ends_early:
                self.defect("unexpected_tag", i, f"{_name(kind)} inside {name} (missing {_name(close)}?)")
                break
            elif kind != Kind.SPACE:
                self.defect("unexpected_tag", i, f"{_name(kind)} inside {name}")
            i += 1
        if i >= n:
            self.defect("unclosed_block", start, f"{name} is never closed")
            return n
        if not has_text:
            self.defect(empty_reason, start, f"{name} has no text")
        return i + 1 if k[i] == close else i

    def branch(self, start: int, depth: int) -> tuple[int, Branch]:
        i, blocks, saw_text = self.seq(start + 1, depth + 1, in_step=True)
        if i >= self.n:
            self.defect("unclosed_block", start, "<step> is never closed")
            return self.n, Branch(start, self.n, blocks)
        if not saw_text and not blocks:
            self.defect("empty_branch", start, "<step> has no text")
        return i + 1, Branch(start, i + 1, blocks)

def _check_args(n: int, response_start: int, max_depth: int) -> None:
    if not 0 <= response_start <= n:
        raise ValueError(f"response_start={response_start} outside [0, {n}]")
    if not 1 <= max_depth <= MAX_SUPPORTED_DEPTH:
        raise ValueError(f"max_depth={max_depth} outside [1, {MAX_SUPPORTED_DEPTH}]")


def parse_kinds(kinds: Sequence[Kind], response_start: int = 0, max_depth: int = 1,
                require_block: bool = False, strict: bool = True) -> tuple[Structure, list[Defect]]:
    """Parse a stream of token kinds. Strict: raise TopologyError at the first defect."""
    _check_args(len(kinds), response_start, max_depth)
    p = _Parser(kinds, max_depth, strict)
    _, blocks, _ = p.seq(response_start, 0, in_step=False)
    if require_block and not blocks:
        p.defect("missing_block", response_start, "no <guideline> block in the response")
    return Structure(blocks, len(kinds), response_start), p.defects


def _as_list(token_ids) -> list[int]:
    return token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)


def parse_structure(token_ids, tags: TagIds, response_start: int = 0, max_depth: int = 1,
                    *, require_block: bool = False) -> Structure:
    """Blocks, plans and branches of one sequence; raises TopologyError if it is invalid.

    Tokens before `response_start` (the prompt) are plain text. With `require_block`, a
    response without any block is invalid too (what the format reward and PAPO filter ask)."""
    ids = _as_list(token_ids)
    structure, _ = parse_kinds(tags.kinds(ids, response_start), response_start, max_depth, require_block)
    return structure


def find_defects(token_ids, tags: TagIds, response_start: int = 0, max_depth: int = 1,
                 *, require_block: bool = False) -> list[Defect]:
    """Every defect of a sequence (empty list = valid), for metrics and diagnostics."""
    ids = _as_list(token_ids)
    _, defects = parse_kinds(tags.kinds(ids, response_start), response_start, max_depth,
                             require_block, strict=False)
    return defects
