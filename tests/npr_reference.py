"""Test helpers: a token DSL, an independent engine replay, and hypothesis strategies.

DSL letters: G/g <guideline></guideline>, P/p <plan></plan>, S/s <step></step>,
K/k <takeaway></takeaway>, a = a text token, _ = a whitespace token.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from megatron_npr.topology import NPR_TAGS, TagIds

TEXT_IDS = list(range(0, 40))
SPACE_IDS = [40, 41]
TAG_BASE = 100
TAGS = TagIds.from_mapping({t: TAG_BASE + i for i, t in enumerate(NPR_TAGS)}, space_ids=SPACE_IDS)
G, g, P, p, S, s, K, k = TAGS.ids
LETTER = {"G": G, "g": g, "P": P, "p": p, "S": S, "s": s, "K": K, "k": k, "a": 7, "_": SPACE_IDS[0]}
ALPHABET = "GgPpSsKka_"


def dsl(text: str) -> list[int]:
    return [LETTER[c] for c in text.replace(" ", "")]


def engine_replay(ids, response_start=0, *, leak_siblings=False, takeaway_after_sum=False):
    """Replay how the parallel engine decodes `ids` (valid input only): each token is appended
    to a KV context list at a position. A `<step>` in the response forks: every branch decodes
    in its own copy of the context, starting at the same position; after the last branch the
    context is the prefix plus all branches, at the end of the longest branch.
    Returns (visible bool [L, L], positions [L]). The flags are deliberately wrong rules."""
    L = len(ids)
    visible = torch.zeros(L, L, dtype=torch.bool)
    pos = torch.zeros(L, dtype=torch.long)

    def emit(i, ctx, p):
        visible[i, ctx + [i]] = True
        pos[i] = p
        ctx.append(i)

    def decode(i, ctx, p, in_branch):
        """Decode from i until the end, or through the `</step>` that ends this branch."""
        while i < L:
            if ids[i] == S and i >= response_start:  # a branch's own <step> is emitted by fork()
                i, p = fork(i, ctx, p)
                continue
            emit(i, ctx, p)
            i, p = i + 1, p + 1
            if in_branch and ids[i - 1] == s:
                return i, p
        return i, p

    def fork(i, ctx, p):
        base_ctx, base_p = list(ctx), p
        branch_tokens, lengths = [], []
        while i < L and ids[i] == S:
            bctx = list(base_ctx) + (branch_tokens if leak_siblings else [])
            emit(i, bctx, base_p)  # the branch's own <step>
            start = i
            i, end_p = decode(i + 1, bctx, base_p + 1, in_branch=True)
            branch_tokens += list(range(start, i))
            lengths.append(end_p - base_p)
        ctx[:] = base_ctx + branch_tokens
        return i, base_p + (sum(lengths) if takeaway_after_sum else max(lengths))

    decode(0, [], 0, in_branch=False)
    return visible, pos


# ---------------------------------------------------------------- hypothesis strategies (DSL strings)
def _text(min_text: int = 0, max_len: int = 4):
    """Text tokens and whitespace; at least `min_text` real text tokens."""
    return st.lists(st.sampled_from("aaa_"), min_size=min_text, max_size=max_len).map("".join).filter(
        lambda t: t.count("a") >= min_text)


_ws = st.sampled_from(["", "", "_"])


@st.composite
def block(draw, depth: int = 0, max_depth: int = 1, max_branches: int = 6):
    n = draw(st.integers(1, max_branches))
    out = "G" + "".join(draw(_ws) + "P" + draw(_text(1)) + "p" for _ in range(n)) + draw(_ws) + "g" + draw(_ws)
    for _ in range(n):
        out += "S" + draw(step_content(depth + 1, max_depth)) + "s"
    return out + "K" + draw(_text(1)) + "k"


@st.composite
def step_content(draw, depth: int, max_depth: int):
    if depth >= max_depth or draw(st.booleans()):
        return draw(_text(1, 6))
    inner = [draw(block(depth, max_depth, max_branches=3)) for _ in range(draw(st.integers(1, 2)))]
    return draw(_text()) + "".join(b + draw(_ws) for b in inner) + draw(_text())


@st.composite
def response(draw, max_depth: int = 1, min_rounds: int = 1, max_rounds: int = 4):
    rounds = [draw(block(0, max_depth)) for _ in range(draw(st.integers(min_rounds, max_rounds)))]
    return draw(_text()) + "".join(b + draw(_ws) for b in rounds) + draw(_text())


@st.composite
def prompt_and_response(draw, max_depth: int = 1, min_rounds: int = 1):
    """Prompt tokens (which may quote tags) and a valid response: (ids, response_start)."""
    prompt = draw(st.lists(st.sampled_from(ALPHABET), max_size=6).map("".join))
    resp = draw(response(max_depth, min_rounds))
    return dsl(prompt) + dsl(resp), len(prompt)
