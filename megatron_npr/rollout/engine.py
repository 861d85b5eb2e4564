"""The parallel rollout engine (torch backend): fork/join decoding over a shared KV slot pool.

A sample is a tree of streams. The trunk decodes until it emits `</guideline>`; if the pre-branch
check passes, each plan forks a branch that sees the trunk's slots (referenced, not copied), starts
at the same position, and opens with the forced `<step>` plus its label. When every sibling has
emitted `</step>`, the trunk adopts their slots in order, moves to g+1+longest branch and continues
with a forced `<takeaway>`. Branches of all samples decode together in one batched forward.
Each stream holds exactly one pool reference on every slot in its visible list.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..topology import Layout, TagIds
from .sampling import SamplingParams, penalise, sample_token, stream_seed


@dataclass
class Script:
    """A replay: the tokens one stream must produce, and for each of its forks one Script per
    branch. Replayed tokens are still scored by the model; forced tokens must match the script."""
    tokens: list[int]
    forks: list[list["Script"]] = field(default_factory=list)
    at: int = 0

    @classmethod
    def from_response(cls, response: list[int], tags: TagIds, max_depth: int = 1) -> "Script":
        from ..topology import parse_structure
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


@dataclass
class Rollout:
    """One sample as the engine produced it; the trainer builds its row from these ids and layout.

    `logprobs[i]` is log p(response token i) under the raw model (temperature 1) in the context
    the engine used when it emitted the token. For sampled tokens that context is exactly the
    layout's, so the trainer's log-prob on the flattened sequence equals it (tested within 1e-5).
    For forced tokens (`forced_mask[i]`, inserted by the engine: each branch's `<step>` and label,
    each block's `<takeaway>`) it is only a record of what the model thought of the insertion: the
    `<step>` opening branch j >= 2 is scored from the trunk's state after `</guideline>`, whereas
    the flattened sequence predicts it from branch j-1's `</step>`. Forced tokens are therefore
    never a training target and never part of a train/inference mismatch (`logprob_mismatch`).
    """
    token_ids: list[int]  # prompt + response
    response_start: int
    layout: Layout | None  # None when the response is not a valid (complete) structure
    logprobs: list[float]  # per response token, in the engine's context (see above)
    forced_mask: list[bool]  # per response token: inserted by the engine, not sampled
    positions: list[int]  # engine position of every token, prompt included
    finish_reason: str  # stop | length | invalid_structure
    stats: dict = field(default_factory=dict)


def logprob_mismatch(rollout: Rollout, trainer_logprobs) -> torch.Tensor:
    """|engine - trainer| log-prob of every response token the engine sampled (float64, forced
    tokens left out). `trainer_logprobs` has one entry per response token, as `rollout.logprobs`.
    The one place a train/inference mismatch is computed: forced tokens cannot leak into it."""
    engine = torch.tensor(rollout.logprobs, dtype=torch.float64)
    trainer = torch.as_tensor(trainer_logprobs, dtype=torch.float64).flatten()
    sampled = ~torch.tensor(rollout.forced_mask, dtype=torch.bool)
    if not engine.shape == trainer.shape == sampled.shape:
        raise ValueError(f"{trainer.numel()} trainer log-probs for {engine.numel()} response tokens "
                         f"({sampled.numel()} forced flags)")
    return (engine - trainer)[sampled].abs()


@dataclass(eq=False)
class _Stream:
    sample: "_Sample"
    slots: torch.Tensor  # visible KV slots, in sequence order
    pos: int  # position of the next token to feed
    seed: int
    depth: int = 0  # 0 = trunk; a branch is one deeper than the stream it forked from
    own_start: int = 0  # slots[own_start:] were written by this stream
    next_input: int | None = None
    after_feed: tuple | None = None  # ("fork", m) or ("done",)
    forced_queue: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    children: list["_Stream"] = field(default_factory=list)
    parent: "_Stream | None" = None
    state: str = "run"  # run | wait (children running) | done (branch closed)
    plans: int = 0
    forks: int = 0
    seen: torch.Tensor | None = None  # branch tokens for the repetition penalty
    last_logits: torch.Tensor | None = None
    script: Script | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)


@dataclass(eq=False)
class _Sample:
    prompt: list[int]
    index: tuple[int, int]
    trunk: _Stream | None = None
    used: int = 0  # tokens counted against max_new_tokens
    blocks: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)


class RolloutScheduler:
    """One `generate` call: admission, batched decoding steps, fork/join, finishing."""

    def __init__(self, engine, params: SamplingParams):
        self.engine, self.params, self.tags = engine, params, engine.tags
        self.live: list[_Sample] = []
        self.done: dict[tuple[int, int], Rollout] = {}

    # ---------------------------------------------------------------- token decisions
    def decide(self, s: _Stream, token: int, logits: torch.Tensor, forced: bool) -> None:
        """Record `token` as the stream's next token (to be fed next step) and react to it."""
        t, p, sample = self.tags, self.params, s.sample
        if forced and s.script is not None and s.script.next() != token:
            raise ValueError(f"replay for sample {sample.index} disagrees with the engine's forced token {token}")
        s.tokens.append(token)
        s.logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        s.forced.append(forced)
        s.positions.append(s.pos)
        sample.used += 1
        if s.seen is not None and not forced:
            s.seen[token] = True
        s.next_input = token
        if token in self.engine.eos_ids:
            return self.finish(sample, "stop" if s.depth == 0 else "invalid_structure")
        if sample.used >= p.max_new_tokens:
            return self.finish(sample, "length")
        if token == t["<guideline>"]:
            s.plans = 0
        elif token == t["<plan>"]:
            s.plans += 1
        elif token == t["</guideline>"] and p.parallel:
            if 1 <= s.plans <= p.max_branches and s.depth < p.max_depth:
                s.after_feed = ("fork", s.plans)
            elif p.on_bad_plan == "finish":
                self.finish(sample, "invalid_structure")
        elif token == t["</step>"] and s.depth > 0 and p.parallel:
            s.after_feed = ("done",)

    def after_feed(self, s: _Stream, logits: torch.Tensor) -> None:
        s.pos += 1
        action, s.after_feed = s.after_feed, None
        if action and action[0] == "fork":
            return self.fork(s, action[1], logits)
        if action and action[0] == "done":
            s.state, s.last_logits = "done", logits
            if all(c.state == "done" for c in s.parent.children):
                self.join(s.parent)
            return
        if s.forced_queue:
            return self.decide(s, s.forced_queue.pop(0), logits, forced=True)
        if s.script is not None:  # replay: the scripted token, scored by the model
            token = s.script.next()
            if token is not None:
                return self.decide(s, token, logits, False)
            s.script = None  # a replay that runs out goes on sampling
        scored = penalise(logits, s.seen, self.params.step_repetition_penalty) if s.seen is not None else logits
        self.decide(s, sample_token(scored, self.params, s.generator), logits, forced=False)

    def fork(self, s: _Stream, branches: int, logits: torch.Tensor) -> None:
        s.state, s.forks = "wait", s.forks + 1
        s.sample.blocks.append(branches)
        for j in range(1, branches + 1):
            self.engine.pool.retain(s.slots)
            child = _Stream(s.sample, s.slots, s.pos, stream_seed(s.seed, s.forks, j), depth=s.depth + 1,
                            own_start=len(s.slots), parent=s, seen=torch.zeros(logits.numel(), dtype=torch.bool))
            child.forced_queue = list(self.engine.label_ids(j))
            if s.script is not None:
                if s.forks > len(s.script.forks) or len(s.script.forks[s.forks - 1]) != branches:
                    raise ValueError(f"replay for sample {s.sample.index} has no {branches}-branch fork here")
                child.script = s.script.forks[s.forks - 1][j - 1]
            s.children.append(child)
            self.decide(child, self.tags["<step>"], logits, forced=True)
            if s.sample.finish_reason:
                return

    def join(self, s: _Stream) -> None:
        kids, s.children = s.children, []
        s.slots = torch.cat([s.slots] + [c.slots[c.own_start:] for c in kids])
        for c in kids:
            self.engine.pool.release(c.slots[:c.own_start])  # own slots now belong to the trunk
            s.tokens += c.tokens
            s.logprobs += c.logprobs
            s.forced += c.forced
            s.positions += c.positions
        s.pos, s.state = max(c.pos for c in kids), "run"
        self.decide(s, self.tags["<takeaway>"], kids[-1].last_logits, forced=True)

    # ---------------------------------------------------------------- samples
    def finish(self, sample: _Sample, reason: str) -> None:
        if sample.finish_reason is None:
            sample.finish_reason = reason

    def running(self) -> list[_Stream]:
        out, stack = [], [x.trunk for x in self.live]
        while stack:
            s = stack.pop()
            if s.state == "run":
                out.append(s)
            stack.extend(s.children)
        return out

    def retire(self, sample: _Sample) -> None:
        """Free every slot of the sample and turn it into a Rollout."""
        trunk, pool = sample.trunk, self.engine.pool
        stack, flat = [trunk], []
        while stack:  # release each live stream's references; flatten unjoined branches after the trunk
            s = stack.pop()
            pool.release(s.slots)
            flat.append(s)
            stack.extend(reversed(s.children))
        pool.unreserve(len(sample.prompt) + self.params.max_new_tokens)
        tokens = [t for s in flat for t in s.tokens]
        self.done[sample.index] = self.engine.make_rollout(
            sample, tokens, [x for s in flat for x in s.logprobs], [x for s in flat for x in s.forced],
            [x for s in flat for x in s.positions], self.params)
