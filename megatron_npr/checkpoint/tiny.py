"""Small randomly initialised Qwen3 models in HF format, with their tokenizer (tiny runs, tests): the
real Qwen3 one or the small one of data.tiny_tokenizer."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..io import atomic_output_dir


@dataclass
class TinyQwen3:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 192
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    seed: int = 0

    def __post_init__(self):
        if min(self.hidden_size, self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads,
               self.head_dim, self.intermediate_size) < 1:
            raise ValueError(f"tiny model sizes must be positive: {asdict(self)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads must divide num_attention_heads")


def padded_vocab(n: int, multiple: int = 128) -> int:
    """Vocabulary rounded up so any TP size dividing `multiple` splits it evenly."""
    return -(-n // multiple) * multiple


def write_random_qwen3(out_dir: str | Path, tokenizer, spec: TinyQwen3 = TinyQwen3()) -> Path:
    """An HF folder (config.json, safetensors, tokenizer with the NPR tags) of a random Qwen3
    whose vocabulary covers `tokenizer` (padded to a multiple of 128). The tokenizer is saved into
    the folder, so every stage given the folder (`load_vocab(model_dir)`) uses it. Written
    atomically; `out_dir` must not be a non-empty folder."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    fields = {k: v for k, v in asdict(spec).items() if k != "seed"}
    config = Qwen3Config(vocab_size=padded_vocab(len(tokenizer)), torch_dtype="float32",
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id, **fields)
    torch.manual_seed(spec.seed)
    model = Qwen3ForCausalLM(config).float()
    with atomic_output_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "npr_tiny.json").write_text(json.dumps(asdict(spec), indent=2))
    return Path(out_dir)
