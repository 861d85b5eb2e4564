"""Human-readable views of one trajectory: a structure summary and a picture of its mask."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .topology import Layout, Structure, TagIds, critical_path_length, layout_from_structure, parse_structure

RESPONSE_MARKER = "<|im_start|>assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"  # what Qwen3's template adds with thinking off: still prompt


@dataclass
class Trajectory:
    token_ids: list[int]
    response_start: int
    structure: Structure
    layout: Layout


def tokenize_trajectory(text: str, tokenizer) -> tuple[list[int], int]:
    """Token ids and response start of a chat text. The prompt (up to the last assistant
    marker) and the response are tokenized separately, as an engine would produce them."""
    cut = text.rfind(RESPONSE_MARKER)
    if cut < 0:
        prompt, response = "", text
    else:
        cut += len(RESPONSE_MARKER)
        cut += len(EMPTY_THINK) if text.startswith(EMPTY_THINK, cut) else 0
        prompt, response = text[:cut], text[cut:]
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    return prompt_ids + tokenizer.encode(response, add_special_tokens=False), len(prompt_ids)


def analyse(token_ids: list[int], response_start: int, tags: TagIds, max_depth: int = 1) -> Trajectory:
    structure = parse_structure(token_ids, tags, response_start, max_depth)
    return Trajectory(token_ids, response_start, structure, layout_from_structure(structure, max_depth))


def describe(t: Trajectory) -> str:
    s, L, r0 = t.structure, len(t.token_ids), t.response_start
    response = L - r0
    critical = critical_path_length(t.layout, r0)
    lines = [f"tokens: {L} (prompt {r0}, response {response})",
             f"rounds: {s.rounds}; blocks: {sum(1 for _ in s.iter_blocks())}; nesting depth: {s.depth}"]
    for n, b in enumerate(s.iter_blocks(), 1):
        lens = [br.end - br.start for br in b.branches]
        pad = "  " * (b.depth + 1)
        lines.append(f"{pad}block {n} at tokens {b.start}-{b.end - 1} (depth {b.depth + 1}): "
                     f"guideline {b.guideline_end - b.start} tokens, {len(b.plans)} plans, branch lengths "
                     f"{lens}, takeaway {b.takeaway[1] - b.takeaway[0]} tokens")
    speedup = response / critical if critical else 1.0
    lines.append(f"critical path: {critical} of {response} response tokens; ideal parallel speedup {speedup:.2f}x")
    return "\n".join(lines)


def draw_mask(t: Trajectory, out: str | Path, max_pixels: int = 1024) -> Path:
    """PNG of the attention mask (white = visible), with block and branch boundaries."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = t.layout.dense_mask().float()
    L = mask.shape[0]
    scale = max(1, -(-L // max_pixels))
    if scale > 1:  # a pixel is visible if any pair under it is
        mask = torch.nn.functional.max_pool2d(mask[None, None], scale, ceil_mode=True)[0, 0]
    fig, ax = plt.subplots(figsize=(8, 8), dpi=120)
    ax.imshow(mask.numpy(), cmap="gray", vmin=0, vmax=1, extent=(0, L, L, 0), interpolation="nearest")

    def mark(i: int, color: str, style: str = "-"):
        ax.axhline(i, color=color, lw=0.6, ls=style)
        ax.axvline(i, color=color, lw=0.6, ls=style)

    if t.response_start:
        mark(t.response_start, "tab:blue", "--")
    for b in t.structure.iter_blocks():
        for br in b.branches:
            mark(br.start, "tab:orange")
        mark(b.takeaway[0], "tab:green")
    ax.set_title(f"NPR attention mask: {L} tokens, {t.structure.rounds} round(s)\n"
                 "blue: response start, orange: branch starts, green: takeaway", fontsize=9)
    ax.set_xlabel("key index")
    ax.set_ylabel("query index")
    out = Path(out)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
