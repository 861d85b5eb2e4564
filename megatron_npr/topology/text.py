"""Text-level views of the grammar: the stage-1 format reward and SFT canonicalisation.

Both lex text into tag / text / whitespace segments and run the one parser of `grammar`, so
the format reward cannot disagree with the token-level structure about what is valid.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .grammar import Defect, parse_kinds
from .tags import KIND_TAGS, Kind, lex_text

# Severity of each defect; the penalty is -2 * tanh(sum / 2): 0 exactly when valid, about
# -weight for one light defect, growing with number and severity and never reaching -2.
SEVERITY: dict[str, float] = {
    "missing_block": 2.0, "steps_plans_mismatch": 1.0, "unclosed_block": 1.0,
    "missing_branch": 1.0, "missing_takeaway": 1.0, "no_plans": 1.0, "nesting_too_deep": 1.0,
    "tag_outside_block": 0.5, "unexpected_tag": 0.5, "text_between_branches": 0.5,
    "text_between_blocks": 0.5, "empty_branch": 0.4, "empty_plan": 0.4, "empty_takeaway": 0.4,
    "text_in_guideline": 0.2, "missing_answer": 1.0, "empty_answer": 1.0,
}
ANSWER_REASONS = {
    "missing_answer": "no complete \\boxed{...} in the text after the last block",
    "empty_answer": "the final \\boxed{} is empty",
}
_BOXED = re.compile(r"\\boxed\s*\{")


@dataclass(frozen=True)
class FormatResult:
    score: float  # 0.0 when valid, else in (-2, 0)
    reasons: tuple[str, ...]  # one per defect, in order
    defects: tuple[Defect, ...] = ()  # .index is a character offset into the text

    @property
    def valid(self) -> bool:
        return not self.reasons


def format_penalty(reasons) -> float:
    total = sum(SEVERITY[r] for r in reasons)
    return 0.0 if total == 0 else -2.0 * math.tanh(total / 2.0)


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (balanced braces), or None."""
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end():i - 1]
    return found


def format_reward(text: str, max_depth: int = 1) -> FormatResult:
    """Stage-1 format check of a response: at least one valid block, then an answer in
    `\\boxed{}` after the last block. Score 0.0 exactly when valid."""
    kinds, offsets = lex_text(text)
    structure, defects = parse_kinds(kinds, 0, max_depth, require_block=True, strict=False)
    at = lambda seg: offsets[seg] if seg < len(offsets) else len(text)  # noqa: E731
    defects = [Defect(d.reason, at(d.index), d.message) for d in defects]
    tail_start = at(structure.blocks[-1].end) if structure.blocks else 0
    answer = last_boxed(text[tail_start:])
    if answer is None:
        defects.append(Defect("missing_answer", tail_start, ANSWER_REASONS["missing_answer"]))
    elif not answer.strip():
        defects.append(Defect("empty_answer", tail_start, ANSWER_REASONS["empty_answer"]))
    reasons = tuple(d.reason for d in defects)
    return FormatResult(format_penalty(reasons), reasons, tuple(defects))


def branch_label(j: int) -> str:
    """Label that opens plan j and branch j (1-based) in canonical text: `<step>{j}: ...`.
    The engine writes exactly this after `<step>`, so the branch knows which plan it runs."""
    return f"{j}:"


_LABEL = re.compile(r"^\s*(?:(?:plan|step)\s*)?(\d+)\s*(?::|[.)](?=\s))\s*", re.IGNORECASE)


@dataclass
class Canonical:
    text: str
    changes: list[str] = field(default_factory=list)


@dataclass
class _Frame:
    start: int  # segment index of <guideline>
    plans: list[int] = field(default_factory=list)  # segment index of each <plan>
    steps: list[list] = field(default_factory=list)  # [start seg, end seg, original label]


def _drop_engine_free_space(kinds, segs, offsets, changes):
    """Whitespace after </guideline> or </step> before <step>/<takeaway>: the engine forks and
    joins right at those tags, so no token can stand there."""
    keep = []
    for i, k in enumerate(kinds):
        if (k == Kind.SPACE and 0 < i < len(kinds) - 1 and kinds[i + 1] in (Kind.STEP_O, Kind.TAKE_O)
                and (kinds[i - 1] == Kind.STEP_C or (kinds[i - 1], kinds[i + 1]) == (Kind.GUIDE_C, Kind.STEP_O))):
            changes.append(f"char {offsets[i]}: removed {segs[i]!r} between "
                           f"{KIND_TAGS[kinds[i - 1]]} and {KIND_TAGS[kinds[i + 1]]}")
            continue
        keep.append(i)
    return [kinds[i] for i in keep], [segs[i] for i in keep], [offsets[i] for i in keep]


def _collect_blocks(kinds, segs) -> list[_Frame]:
    stack: list[_Frame] = []
    done: list[_Frame] = []
    for i, k in enumerate(kinds):
        if k == Kind.GUIDE_O:
            stack.append(_Frame(i))
        elif not stack:
            continue
        elif k == Kind.PLAN_O:
            stack[-1].plans.append(i)
        elif k == Kind.STEP_O:
            m = _LABEL.match(segs[i + 1]) if i + 1 < len(segs) and kinds[i + 1] in (Kind.TEXT, Kind.SPACE) else None
            stack[-1].steps.append([i, None, int(m.group(1)) if m else None])
        elif k == Kind.STEP_C and stack[-1].steps:
            stack[-1].steps[-1][1] = i
        elif k == Kind.TAKE_C:
            done.append(stack.pop())
    return done


def _set_label(kinds, segs, tag_seg: int, j: int, what: str, changes, offsets):
    """Make the text after the tag at `tag_seg` start with the canonical label of j."""
    label = branch_label(j)
    nxt = tag_seg + 1
    if nxt < len(segs) and kinds[nxt] in (Kind.TEXT, Kind.SPACE):
        old = segs[nxt]
        m = _LABEL.match(old)
        rest = old[m.end():] if m else old
        # a blank rest is dropped: kept, the label pattern would absorb it on the next pass
        new = label + (" " + rest.lstrip() if rest.strip() else "")
        if new != old:
            head = len(old) - len(rest.lstrip()) if rest.strip() else len(old)
            changes.append(f"char {offsets[tag_seg]}: {what} {j}: {old[:head]!r} -> {new[:len(new) - len(old) + head]!r}")
            segs[nxt] = new
    else:
        changes.append(f"char {offsets[tag_seg]}: {what} {j}: added label {label!r}")
        segs[tag_seg] += label


def canonicalize(text: str) -> Canonical:
    """Turn an NPR response in the paper's looser form into the canonical form the engine
    produces: no whitespace after `</guideline>` / `</step>` before `<step>` / `<takeaway>`,
    plans and branches labelled `j: ` in order, and branches reordered to follow their plans
    when their labels are a permutation. Reports every change; does not validate (use
    `format_reward` afterwards)."""
    changes: list[str] = []
    kinds, offsets = lex_text(text)
    segs = [text[a:b] for a, b in zip(offsets, offsets[1:] + [len(text)])]
    kinds, segs, offsets = _drop_engine_free_space(kinds, segs, offsets, changes)
    frames = _collect_blocks(kinds, segs)
    for f in frames:
        for j, p in enumerate(f.plans, 1):
            _set_label(kinds, segs, p, j, "plan", changes, offsets)
        labels = [s[2] for s in f.steps]
        contiguous = all(s[1] is not None for s in f.steps) and all(
            a[1] + 1 == b[0] for a, b in zip(f.steps, f.steps[1:]))
        reorder = contiguous and sorted(labels, key=lambda x: x or 0) == list(range(1, len(labels) + 1)) \
            and labels != sorted(labels)
        for pos, (start, _, label) in enumerate(f.steps, 1):
            _set_label(kinds, segs, start, label if reorder else pos, "step", changes, offsets)
        if reorder:  # inner blocks were finished (and moved) before outer ones, so ranges hold
            lo, hi = f.steps[0][0], f.steps[-1][1] + 1
            by_label = sorted(f.steps, key=lambda s: s[2])
            segs[lo:hi] = [seg for s in by_label for seg in segs[s[0]:s[1] + 1]]
            kinds[lo:hi] = [k for s in by_label for k in kinds[s[0]:s[1] + 1]]
            changes.append(f"char {offsets[f.start]}: branches reordered from labels {labels} to plan order")
    return Canonical("".join(segs), changes)
