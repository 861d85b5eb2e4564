"""Helpers for the rejection-sampling and evaluation tests: a tiny random Qwen3 over the real
Qwen3 vocabulary (NPR tags included), engines that replay or script responses, synthetic data."""
from __future__ import annotations

import json
from collections import defaultdict

import torch

from megatron_npr.data.prompts import prompt_ids
from megatron_npr.rollout import NPREngine, Rollout
from megatron_npr.topology import Layout, branch_label

VOCAB = 151680  # the Qwen3 tokenizer with the eight NPR tags ends at id 151676


def tiny_qwen(seed: int = 0):
    """A 1-layer, 32-wide random Qwen3ForCausalLM: fast, and every real token id fits."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    return Qwen3ForCausalLM(cfg).eval()


def eos_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def tiny_engine(tokenizer, tags, model=None) -> NPREngine:
    model = model or tiny_qwen()
    return NPREngine(model.config.to_dict(), model.state_dict(), tags=tags, eos_ids=[eos_id(tokenizer)],
                     label_ids=lambda j: tokenizer.encode(branch_label(j), add_special_tokens=False), kv_slots=1 << 14)


def write_problems(path, problems) -> None:
    """Benchmark-style JSONL (ids come from the record index, the source from the file name)."""
    path.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in problems))


def response_ids(tokenizer, text: str, finish: str = "stop") -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) + ([eos_id(tokenizer)] if finish == "stop" else [])


class ReplayEngine:
    """The real engine, made to decode a given response per prompt (by question) instead of sampling."""

    def __init__(self, engine, tokenizer, responses: dict[str, str]):
        self.engine = engine
        self.responses = {tuple(prompt_ids(q, tokenizer)): response_ids(tokenizer, text)
                          for q, text in responses.items()}

    def generate(self, prompts, params, *, replay=None, seeds=None):
        if replay is None:
            replay = [self.responses[tuple(p)] for p in prompts]
        return self.engine.generate(prompts, params, replay=replay, seeds=seeds)


class ScriptedEngine:
    """generate() like NPREngine's, answering the i-th draw for a question with script[question][i]:
    (text, finish_reason). `<step>` tokens are marked forced, as a parallel engine would. Raises
    on call number `crash_on_call` (a simulated crash); records every seed it is given."""

    def __init__(self, tokenizer, tags, scripts: dict[str, list[tuple[str, str]]], crash_on_call: int | None = None):
        self.tokenizer, self.tags, self.crash_on_call = tokenizer, tags, crash_on_call
        self.scripts = {tuple(prompt_ids(q, tokenizer)): (q, s) for q, s in scripts.items()}
        self.drawn: dict[tuple, int] = defaultdict(int)
        self.seeds: dict[str, list[int]] = defaultdict(list)  # question -> seed of each call
        self.calls = 0

    def generate(self, prompts, params, *, replay=None, seeds=None):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise RuntimeError("simulated crash")
        out = []
        for i, prompt in enumerate(prompts):
            question, script = self.scripts[tuple(prompt)]
            self.seeds[question].append(seeds[i])
            for _ in range(params.n):
                text, finish = script[self.drawn[tuple(prompt)]]
                self.drawn[tuple(prompt)] += 1
                out.append(self._rollout(list(prompt), response_ids(self.tokenizer, text, finish), finish))
        return out

    def _rollout(self, prompt, response, finish) -> Rollout:
        ids = prompt + response
        forced = [t == self.tags["<step>"] for t in response]
        return Rollout(ids, len(prompt), Layout.causal(len(ids)) if finish == "stop" else None, [0.0] * len(response),
                       forced, list(range(len(ids))), finish, {"response_tokens": len(response)})
