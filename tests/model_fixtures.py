"""Tiny random Qwen3 models and NPR batches shared by the model tests and their workers."""
from __future__ import annotations

import torch

from megatron_npr.topology import PackSample, build_layout, pack
from npr_reference import TAG_BASE, TAGS, dsl

VOCAB = 256


def tiny_hf_model(tied: bool = False, layers: int = 4, seed: int = 0, vocab: int = VOCAB):
    """A random Qwen3ForCausalLM; norms are perturbed so a mapping mistake shows up."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                      rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
                      tie_word_embeddings=tied, max_position_embeddings=512, attn_implementation="eager")
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


TRAJECTORIES = [  # (dsl, response_start): flat, several rounds, nested (depth 2), no block
    ("aaa G P a p P a p P a p g S a a s S a a a a s S a s K a a k a a", 3),
    ("aa G P a p P a p g S a s S a a s K a k _ G P a p P a p g S a a a s S a s K a k a", 2),
    ("a G P a p P a p g S a G P a p P a p g S a a s S a s K a k a s S a a s K a k a", 1),
    ("aaaa a a a", 2),
]


def npr_batch(length: int = 96, seed: int = 1):
    """Two packed rows of the trajectories above with random text tokens, as an NPRBatch."""
    from megatron_npr.models import NPRBatch

    g = torch.Generator().manual_seed(seed)
    samples = []
    for text, response_start in TRAJECTORIES:
        ids = dsl(text)
        tokens = torch.tensor([t if t >= TAG_BASE else int(torch.randint(0, TAG_BASE, (1,), generator=g))
                               for t in ids])
        layout = build_layout(ids, TAGS, response_start, max_depth=2)
        samples.append(PackSample(tokens, torch.arange(len(ids)) >= response_start, layout))
    rows = pack(samples, length)
    assert len(rows) == 2, [r.num_tokens for r in rows]
    return NPRBatch.from_rows(rows, length=length, pad_id=0)


def hf_reference_logits(hf_model, batch) -> torch.Tensor:
    """HF logits given the dense NPR mask (4D additive) and the layout's position ids."""
    mask = batch.dense_mask()[:, None]
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        return hf_model(input_ids=batch.tokens, attention_mask=additive, position_ids=batch.position_ids).logits
