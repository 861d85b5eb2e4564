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


def additive_mask(visible: torch.Tensor) -> torch.Tensor:
    """HF's 4D additive form [b, 1, s, s] of a boolean visibility mask ([s, s] or [b, s, s])."""
    if visible.dim() == 2:
        visible = visible[None]
    return torch.where(visible[:, None], 0.0, torch.finfo(torch.float32).min)


def hf_reference_logits(hf_model, batch) -> torch.Tensor:
    """HF logits given the dense NPR mask (4D additive) and the layout's position ids."""
    with torch.no_grad():
        return hf_model(input_ids=batch.tokens, attention_mask=additive_mask(batch.dense_mask()),
                        position_ids=batch.position_ids).logits


def megatron_from_hf(hf_model, **config_kwargs):
    """The Megatron model (this process's TP/PP part) with an HF model's weights, fp32."""
    from megatron_npr.checkpoint.megatron_io import load_hf_into_model
    from megatron_npr.models import build_model, transformer_config_from_hf

    cfg = hf_model.config.to_dict()
    model = build_model(transformer_config_from_hf(cfg, dtype=torch.float32, **config_kwargs))
    load_hf_into_model(model, hf_model.state_dict(), cfg)
    return model
