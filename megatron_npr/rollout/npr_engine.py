"""NPREngine: the torch rollout backend (CPU runs, single-GPU runs, the reference for others)."""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch.nn.utils.rnn import pad_sequence

from ..topology import Layout, TagIds, TopologyError, branch_label, build_layout
from .engine import Rollout, RolloutScheduler, Script, _Sample, _Stream
from .pool import SlotPool
from .qwen3_torch import KVCache, Qwen3Spec, Qwen3Weights, forward
from .sampling import SamplingParams, sample_token, stream_seed


class NPREngine:
    def __init__(self, hf_config: dict, tensors: Mapping | Iterable, *, tags: TagIds, eos_ids: Iterable[int],
                 label_ids: Callable[[int], list[int]], kv_slots: int = 1 << 16, prefill_chunk: int = 512,
                 dtype: torch.dtype = torch.float32, device: str = "cpu"):
        spec = Qwen3Spec.from_hf_config(hf_config)
        if max(tags.ids) >= spec.vocab_size:
            raise ValueError(f"NPR tag ids {tags.ids} do not fit the model's vocabulary of {spec.vocab_size}; "
                             "convert the checkpoint with --add-npr-tokens")
        self.spec, self.tags, self.eos_ids, self.label_ids = spec, tags, frozenset(eos_ids), label_ids
        self.weights = Qwen3Weights(spec, tensors if isinstance(tensors, Mapping) else dict(tensors), dtype, device)
        self.cache = KVCache(spec, kv_slots, dtype, device)
        self.pool = SlotPool(kv_slots)
        self.prefill_chunk, self.device = prefill_chunk, device

    @classmethod
    def from_hf(cls, hf_dir, tokenizer_dir=None, **kwargs) -> "NPREngine":
        """An HF Qwen3 folder; the tokenizer (with the NPR tags) from `tokenizer_dir`, the model
        folder if it has one, else the bundled Qwen3 tokenizer."""
        from ..checkpoint import open_hf_weights, read_hf_config
        from ..data.tokenizer import load_tokenizer, tokenizer_dir_for

        hf_dir = Path(hf_dir)
        tokenizer, tags = load_tokenizer(tokenizer_dir_for(hf_dir, tokenizer_dir))
        eos = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} - {None}
        with open_hf_weights(hf_dir) as weights:
            return cls(read_hf_config(hf_dir), weights, tags=tags, eos_ids=eos,
                       label_ids=lambda j: tokenizer.encode(branch_label(j), add_special_tokens=False), **kwargs)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named tensors (what the trainer exports) in place; returns how many."""
        return self.weights.update(named_tensors)

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 replay: list[list[int]] | None = None, seeds: list[int] | None = None) -> list[Rollout]:
        """n rollouts per prompt, prompt-major. Every KV slot is free again on return. `replay`
        gives one response per prompt to reproduce instead of sampling (benchmarks, tests): the
        engine still forks, joins and scores every token. `seeds` gives each prompt its own seed
        (instead of params.seed and the prompt's index), so its samples do not depend on batching."""
        if replay is not None and len(replay) != len(prompts):
            raise ValueError(f"replay has {len(replay)} responses for {len(prompts)} prompts")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
        need = [params.n * (len(p) + params.max_new_tokens) for p in prompts]
        for i, (p, slots) in enumerate(zip(prompts, need)):
            if not p or min(p) < 0 or max(p) >= self.spec.vocab_size:
                raise ValueError(f"prompt {i} is empty or has ids outside [0, {self.spec.vocab_size})")
            if slots > self.pool.num_slots:
                raise ValueError(f"prompt {i} needs {slots} KV slots (n x (prompt + max_new_tokens)); the pool "
                                 f"has {self.pool.num_slots}: raise kv_slots or lower max_new_tokens")
        sched = RolloutScheduler(self, params)
        queue = deque(range(len(prompts)))
        while queue or sched.live:
            while queue and self.pool.try_reserve(need[queue[0]]):  # the rest wait for memory
                i = queue.popleft()
                self._admit(sched, i, prompts[i], params, replay[i] if replay else None,
                            None if seeds is None else seeds[i])
            self._retire_finished(sched)
            streams = sched.running()
            if streams:
                self._step(sched, streams)
            self._retire_finished(sched)
        self.pool.assert_empty()
        return [sched.done[(i, k)] for i in range(len(prompts)) for k in range(params.n)]

    def _admit(self, sched: RolloutScheduler, index: int, prompt: list[int], params: SamplingParams,
               replay: list[int] | None, seed: int | None = None) -> None:
        """Prefill the prompt once (chunked); its n samples fork from it."""
        slots, logits = torch.empty(0, dtype=torch.long), None
        for start in range(0, len(prompt), self.prefill_chunk):
            chunk = prompt[start:start + self.prefill_chunk]
            slots = torch.cat([slots, self.pool.allocate(len(chunk))])
            ends = torch.arange(start + 1, start + len(chunk) + 1)
            logits = forward(self.weights, self.cache, torch.tensor(chunk), torch.arange(start, start + len(chunk)),
                             slots[start:], slots.expand(len(chunk), -1), ends)
        for k in range(params.n):
            sample = _Sample(prompt, (index, k))
            self.pool.retain(slots)
            trunk = sample.trunk = _Stream(sample, slots, len(prompt), self._trunk_seed(params, index, k, seed))
            sched.live.append(sample)
            if replay is not None:
                trunk.script = Script.from_response(replay, self.tags, params.max_depth) if params.parallel \
                    else Script(list(replay))
                token = trunk.script.next()
            else:
                token = sample_token(logits[-1], params, trunk.generator)
            sched.decide(trunk, token, logits[-1], False)
        self.pool.release(slots)

    @staticmethod
    def _trunk_seed(params: SamplingParams, index: int, k: int, prompt_seed: int | None) -> int:
        if prompt_seed is None:
            return stream_seed(params.seed, index, k)
        return stream_seed(prompt_seed, k)

    def _step(self, sched: RolloutScheduler, streams: list[_Stream]) -> None:
        """Feed every running stream its next token in one batched forward."""
        write = self.pool.allocate(len(streams))
        for s, slot in zip(streams, write):
            s.slots = torch.cat([s.slots, slot.view(1)])
        logits = forward(self.weights, self.cache, torch.tensor([s.next_input for s in streams]),
                         torch.tensor([s.pos for s in streams]), write,
                         pad_sequence([s.slots for s in streams], batch_first=True),
                         torch.tensor([len(s.slots) for s in streams]))
        for s, row in zip(streams, logits):
            if not s.sample.finish_reason:
                sched.after_feed(s, row)

    @staticmethod
    def _retire_finished(sched: RolloutScheduler) -> None:
        for sample in [x for x in sched.live if x.finish_reason]:
            sched.live.remove(sample)
            sched.retire(sample)

    def make_rollout(self, sample: _Sample, tokens, logprobs, forced, positions, params) -> Rollout:
        ids, r0 = sample.prompt + tokens, len(sample.prompt)
        reason, layout = sample.finish_reason, None
        if reason == "stop" and not params.parallel:
            layout = Layout.causal(len(ids))
        elif reason == "stop":
            try:
                layout = build_layout(ids, self.tags, r0, params.max_depth)
            except TopologyError:
                reason = "invalid_structure"
            else:
                if layout.position_ids[r0:].tolist() != positions:
                    raise RuntimeError(f"engine bug: decode positions differ from build_layout for sample "
                                       f"{sample.index}")
        stats = {"response_tokens": len(tokens), "critical_path_tokens": (max(positions) + 1 - r0) if positions else 0,
                 "blocks": len(sample.blocks), "branches_per_block": list(sample.blocks),
                 "parallel_triggered": bool(sample.blocks), "wall_time_s": time.perf_counter() - sample.started}
        return Rollout(ids, r0, layout, logprobs, forced, list(range(r0)) + positions, reason, stats)
