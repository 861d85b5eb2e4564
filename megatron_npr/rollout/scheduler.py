"""The rollout scheduler: one `generate` call's sample trees, token decisions, fork/join and slots.

A sample is a tree of streams. The trunk decodes until it emits `</guideline>`; if the pre-branch
check passes, each plan forks a branch that sees the trunk's slots (referenced, not copied), starts
at the same position, and opens with the forced `<step>` plus its label. When every sibling has
emitted `</step>`, the trunk adopts their slots in order, moves to g+1+longest branch and continues
with a forced `<takeaway>`. Branches of all samples decode together in one batched step.
Each stream holds exactly one pool reference on every slot in its visible list.

The scheduler never runs the model. Its seam with an engine is small: the engine reserves room
(`try_reserve`), prefills a prompt and hands over its slots and last logits (`admit`), runs the
model on each `DecodeStep` (`next_step`) and returns the logits (`advance`), calls
`retire_finished` between steps, and collects `rollouts()` at the end.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn.utils.rnn import pad_sequence

from ..seeding import stream_seed
from ..topology import Layout, TagIds, TopologyError, build_layout
from .pool import SlotPool
from .replay import ReplayMismatch, Script
from .rollout import Rollout
from .sampling import SamplingParams, penalise, sample_token


@dataclass(frozen=True)
class DecodeVocab:
    """The token ids decoding reacts to: the NPR tags, the ids that end a sample, and the ids
    inserted after branch j's `<step>` (`label_ids(j)`). An `NPRVocab` provides the same three."""
    tags: TagIds
    eos_ids: frozenset[int]
    label_ids: Callable[[int], list[int]]


@dataclass
class DecodeStep:
    """One batched decoding step: feed `tokens` at `positions`, write their K/V to `write_slots`;
    row b attends to `visible_slots[b, :lengths[b]]` (its own new slot included)."""
    tokens: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    write_slots: torch.Tensor  # [B]
    visible_slots: torch.Tensor  # [B, max length], right-padded
    lengths: torch.Tensor  # [B]
    streams: list["_Stream"]  # the scheduler's own record of which stream each row feeds


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
    index: tuple[int, int]  # (prompt, sample)
    trunk: _Stream | None = None
    used: int = 0  # tokens counted against max_new_tokens
    blocks: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)


class RolloutScheduler:
    """One `generate` call: admission, batched decoding steps, fork/join, finishing."""

    def __init__(self, params: SamplingParams, vocab: DecodeVocab, pool: SlotPool):
        self.params, self.vocab, self.tags, self.pool = params, vocab, vocab.tags, pool
        self.live: list[_Sample] = []
        self.done: dict[tuple[int, int], Rollout] = {}

    # ---------------------------------------------------------------- the engine's side
    def slots_needed(self, prompt_len: int) -> int:
        """The worst case of a prompt's n samples: each may use prompt + max_new_tokens slots."""
        return self.params.n * (prompt_len + self.params.max_new_tokens)

    def try_reserve(self, prompt_len: int) -> bool:
        """Reserve a prompt's worst case; False when the pool cannot take it yet."""
        return self.pool.try_reserve(self.slots_needed(prompt_len))

    def admit(self, index: int, prompt: list[int], slots: torch.Tensor, logits: torch.Tensor,
              replay: list[int] | None = None, seed: int | None = None) -> None:
        """Start the n samples of a reserved, prefilled prompt. Takes over the engine's one
        reference on the prompt's `slots`; `logits` are the model's at the last prompt token."""
        p = self.params
        for k in range(p.n):
            sample = _Sample(prompt, (index, k))
            self.pool.retain(slots)
            trunk = sample.trunk = _Stream(sample, slots, len(prompt), self._trunk_seed(index, k, seed))
            self.live.append(sample)
            if replay is not None:
                trunk.script = Script.from_response(replay, self.tags, p.max_depth) if p.parallel \
                    else Script(list(replay))
                token = trunk.script.next()
            else:
                token = sample_token(logits, p, trunk.generator)
            self.decide(trunk, token, logits, False)
        self.pool.release(slots)

    @property
    def busy(self) -> bool:
        """Some admitted sample is still decoding."""
        return bool(self.live)

    def next_step(self) -> DecodeStep | None:
        """Allocate a slot for each running stream's next token; None when nothing runs."""
        streams = self.running()
        if not streams:
            return None
        write = self.pool.allocate(len(streams))
        for s, slot in zip(streams, write):
            s.slots = torch.cat([s.slots, slot.view(1)])
        return DecodeStep(torch.tensor([s.next_input for s in streams]), torch.tensor([s.pos for s in streams]),
                          write, pad_sequence([s.slots for s in streams], batch_first=True),
                          torch.tensor([len(s.slots) for s in streams]), streams)

    def advance(self, step: DecodeStep, logits: torch.Tensor) -> None:
        """React to the model's logits [B, vocab] for every row of `step`."""
        for s, row in zip(step.streams, logits):
            if not s.sample.finish_reason:
                self.after_feed(s, row)

    def retire_finished(self) -> None:
        """Free the slots of every finished sample and turn it into a Rollout."""
        for sample in [x for x in self.live if x.finish_reason]:
            self.live.remove(sample)
            self._retire(sample)

    def rollouts(self, num_prompts: int) -> list[Rollout]:
        """Every sample's Rollout, prompt-major."""
        return [self.done[(i, k)] for i in range(num_prompts) for k in range(self.params.n)]

    def running(self) -> list[_Stream]:
        out, stack = [], [x.trunk for x in self.live]
        while stack:
            s = stack.pop()
            if s.state == "run":
                out.append(s)
            stack.extend(s.children)
        return out

    # ---------------------------------------------------------------- token decisions
    def decide(self, s: _Stream, token: int, logits: torch.Tensor, forced: bool) -> None:
        """Record `token` as the stream's next token (to be fed next step) and react to it."""
        t, p, sample = self.tags, self.params, s.sample
        if forced and s.script is not None and s.script.next() != token:
            raise ReplayMismatch(f"replay for sample {sample.index} disagrees with the engine's forced token {token}")
        s.tokens.append(token)
        s.logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        s.forced.append(forced)
        s.positions.append(s.pos)
        sample.used += 1
        if s.seen is not None and not forced:
            s.seen[token] = True
        s.next_input = token
        if token in self.vocab.eos_ids:
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
            self.pool.retain(s.slots)
            child = _Stream(s.sample, s.slots, s.pos, stream_seed(s.seed, s.forks, j), depth=s.depth + 1,
                            own_start=len(s.slots), parent=s, seen=torch.zeros(logits.numel(), dtype=torch.bool))
            child.forced_queue = list(self.vocab.label_ids(j))
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
            self.pool.release(c.slots[:c.own_start])  # own slots now belong to the trunk
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

    def _trunk_seed(self, index: int, k: int, prompt_seed: int | None) -> int:
        if prompt_seed is None:
            return stream_seed(self.params.seed, index, k)
        return stream_seed(prompt_seed, k)

    def _retire(self, sample: _Sample) -> None:
        stack, flat = [sample.trunk], []
        while stack:  # release each live stream's references; flatten unjoined branches after the trunk
            s = stack.pop()
            self.pool.release(s.slots)
            flat.append(s)
            stack.extend(reversed(s.children))
        self.pool.unreserve(len(sample.prompt) + self.params.max_new_tokens)
        self.done[sample.index] = self._to_rollout(sample, flat)

    def _to_rollout(self, sample: _Sample, flat: list[_Stream]) -> Rollout:
        tokens, positions = [t for s in flat for t in s.tokens], [x for s in flat for x in s.positions]
        ids, r0 = sample.prompt + tokens, len(sample.prompt)
        reason, layout = sample.finish_reason, None
        if reason == "stop" and not self.params.parallel:
            layout = Layout.causal(len(ids))
        elif reason == "stop":
            try:
                layout = build_layout(ids, self.tags, r0, self.params.max_depth)
            except TopologyError:
                reason = "invalid_structure"
            else:
                if layout.position_ids[r0:].tolist() != positions:
                    raise RuntimeError(f"engine bug: decode positions differ from build_layout for sample "
                                       f"{sample.index}")
        stats = {"response_tokens": len(tokens), "critical_path_tokens": (max(positions) + 1 - r0) if positions else 0,
                 "blocks": len(sample.blocks), "branches_per_block": list(sample.blocks),
                 "parallel_triggered": bool(sample.blocks), "wall_time_s": time.perf_counter() - sample.started}
        return Rollout(ids, r0, layout, [x for s in flat for x in s.logprobs], [x for s in flat for x in s.forced],
                       list(range(r0)) + positions, reason, stats)
