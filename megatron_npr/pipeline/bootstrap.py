"""Bootstrap of a tiny random Qwen3 on synthetic NPR solutions, fast enough for a 2-core CPU.

The bootstrap keeps every embedding row outside the task's token set T frozen at zero (embeddings
are tied). A zero row has logit exactly 0, so the full softmax needs only the |T| live logits:

    log Z = logaddexp(logsumexp(logits_T), log(V - |T|))

This is the exact full-vocabulary loss of the constrained model, and its cost does not depend on
the vocabulary: with the real Qwen3 tokenizer (`tokenizer: qwen3`, 151k rows, where the output
layer costs ~30x the rest of a tiny model on a CPU) it is what makes the bootstrap take minutes
instead of half an hour; with the pipeline's 512-token tokenizer it is still ~10% faster than
plain training. The saved checkpoint is an ordinary Qwen3 (zero rows included) that the engine and
the Megatron trainer use unchanged. Every sample trains under its own layout (`bootstrap_samples`:
causal for plain chains and some NPR solutions, the branch layout for the others).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..checkpoint import atomic_output_dir


class _TaskVocabModel(torch.nn.Module):
    """The HF model's body plus the live rows `embed` of the tied embedding (ids in `vocab`)."""

    def __init__(self, hf_model, vocab: torch.Tensor):
        super().__init__()
        self.body, self.vocab_size = hf_model.model, hf_model.config.vocab_size
        full = hf_model.model.embed_tokens.weight.detach()
        self.embed = torch.nn.Parameter(full[vocab].clone())
        self.register_buffer("index_of", torch.full((self.vocab_size,), -1, dtype=torch.long))
        self.index_of[vocab] = torch.arange(len(vocab))
        self.log_dead = math.log(self.vocab_size - len(vocab))

    def token_logprobs(self, tokens, positions, visible, targets) -> torch.Tensor:
        local = self.index_of[tokens]
        mask = torch.where(visible[:, None], 0.0, torch.finfo(torch.float32).min)
        hidden = self.body(inputs_embeds=self.embed[local], attention_mask=mask,
                           position_ids=positions).last_hidden_state
        logits = hidden @ self.embed.T
        log_z = torch.logaddexp(torch.logsumexp(logits, -1), torch.tensor(self.log_dead))
        target_local = self.index_of[targets].clamp(min=0)
        return logits.gather(-1, target_local[..., None])[..., 0] - log_z


def bootstrap_samples(path: str | Path, vocab, *, causal_npr: float, parallel_npr: float, max_tokens: int,
                      seed: int = 0) -> list:
    """The bootstrap records of `path` (synthetic problems with a canonical NPR `solution`) as
    training samples, one per record, drawn with `seed`:

    - `causal_npr` of them: the NPR solution, causal (as a sequential decode samples it: every
      token sampled, tags included, each `<step>` seeing the ones before it);
    - `parallel_npr`: the NPR solution under its branch layout (shared positions, branches blind
      to each other, engine-inserted tokens out of the loss), as SFT trains it;
    - the rest: the plain sequential chain (`data.synth.plain_solution`), causal.

    A sequential decode then opens a block only sometimes (what stage 1 starts from), while the
    branch-layout share stands in for what a pretrained LLM brings to stage 2: a tiny model cannot
    learn blind branches from a few hundred SFT samples in a minute."""
    import json
    import random

    from ..data.synth import plain_solution
    from ..topology import Layout
    from ..training.samples import to_sample

    if min(causal_npr, parallel_npr) < 0 or causal_npr + parallel_npr > 1:
        raise ValueError(f"need causal_npr, parallel_npr >= 0 with a sum <= 1, got {causal_npr}, {parallel_npr}")
    rng = random.Random(seed)
    samples = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record, u = json.loads(line), rng.random()
        text = record["solution"] if u < causal_npr + parallel_npr else plain_solution(record["question"])
        prompt = vocab.prompt_ids(record["question"], "")
        response = vocab.tokenizer.encode(text, add_special_tokens=False) + [vocab.end_of_turn_id]
        n = len(prompt) + len(response)
        if n > max_tokens:
            raise ValueError(f"{path}:{line_no}: {n} tokens > bootstrap.max_tokens {max_tokens}")
        if u < parallel_npr:
            samples.append(to_sample(prompt, response, vocab))  # the branch layout of its structure
        else:
            samples.append(to_sample(prompt, response, vocab, layout=Layout.causal(n), forced=[False] * len(response)))
    return samples


def task_vocab(samples, extra_ids=()) -> torch.Tensor:
    ids = set(int(i) for i in extra_ids)
    for s in samples:
        ids.update(s.token_ids.tolist())
    return torch.tensor(sorted(ids))


def bootstrap_tiny(hf_dir: str | Path, samples, out_dir: str | Path, *, steps: int, lr: float, rows_per_step: int,
                   max_tokens: int, extra_ids=(), seed: int = 0, warmup: int = 20, log_every: int = 25,
                   progress: bool = True) -> dict:
    """Train the HF model in `hf_dir` on `samples` (SFT samples with NPR layouts); write the result
    to `out_dir` as an HF folder. Returns the loss history."""
    torch.manual_seed(seed)
    # bit-reproducible from run to run: otherwise CPU kernels reduce in a varying order, and 800
    # steps at this rate turn 4e-7 after 60 steps into another model (held-out accuracy 0.28 in
    # one run, 0.42 in another); not slower here
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(hf_dir, samples, out_dir, steps=steps, lr=lr, rows_per_step=rows_per_step,
                      max_tokens=max_tokens, extra_ids=extra_ids, seed=seed, warmup=warmup, log_every=log_every,
                      progress=progress)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _train(hf_dir, samples, out_dir, *, steps, lr, rows_per_step, max_tokens, extra_ids, seed, warmup, log_every,
           progress) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from ..training.loader import PackedLoader

    hf = Qwen3ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="sdpa")
    if not hf.config.tie_word_embeddings:
        raise ValueError(f"{hf_dir}: the bootstrap needs tied embeddings (tie_word_embeddings=true)")
    vocab = task_vocab(samples, extra_ids)
    model = _TaskVocabModel(hf, vocab).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))))
    loader = PackedLoader(samples, max_tokens, rows_per_step, micro_rows=rows_per_step, seed=seed)
    history, started = [], time.perf_counter()
    bar = tqdm(range(steps), desc="bootstrap", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = loader.next_step().microbatches[0]
        targets, valid = batch.targets()
        logprobs = model.token_logprobs(batch.tokens, batch.position_ids, batch.dense_mask(), targets)
        loss = -(logprobs * valid).sum() / valid.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        history.append({"step": step + 1, "loss": loss.item(), "lr": schedule.get_last_lr()[0]})
        if (step + 1) % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    with torch.no_grad():
        full = torch.zeros_like(hf.model.embed_tokens.weight)
        full[vocab] = model.embed
        hf.model.embed_tokens.weight.copy_(full)  # tied: the output layer is the same tensor
    with atomic_output_dir(out_dir) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(tmp)
    return {"history": history, "task_vocab": len(vocab), "seconds": time.perf_counter() - started,
            "packing_efficiency": loader.packing_efficiency}
