"""Model dimensions for `npr plan`: a Qwen3 config.json (model.hf_dir or --model PATH) or a
built-in preset with the public Qwen3 dims, and parameter counts per pipeline stage and TP rank."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Public config.json values of the Qwen3 dense models (Hugging Face, Qwen/Qwen3-*)
PRESETS = {
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
}


class PlanInputError(ValueError):
    """Bad input to `npr plan` (exit code 2): the message names the key or path."""


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelDims:
        heads = int(cfg["num_attention_heads"])
        return cls(int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), heads,
                   int(cfg.get("num_key_value_heads") or heads),
                   int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                   int(cfg["intermediate_size"]), int(cfg["vocab_size"]), bool(cfg.get("tie_word_embeddings", False)))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self, tp: int = 1) -> int:
        """One decoder layer on one TP rank: the linears are split, the norms replicated."""
        h = self.hidden
        linears = h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + 3 * h * self.ffn
        norms = 2 * h + 2 * self.head_dim  # input/post-attention norms, q_norm and k_norm
        return linears // tp + norms

    def embedding_params(self, tp: int = 1) -> int:
        return self.vocab * self.hidden // tp

    def total_params(self) -> int:
        """The whole model (HF count): embedding, layers, final norm, and lm_head unless tied."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.embedding_params() + self.layers * self.layer_params() + self.hidden + head

    def stage_params(self, tp: int, pp: int, stage: int) -> int:
        """Parameters held by one rank of pipeline `stage`. Megatron gives the first stage the
        embedding and the last the final norm and output layer; with tied embeddings and pp > 1
        the last stage keeps its own copy of the embedding as the output weight."""
        n = self.layers // pp * self.layer_params(tp)
        first, last = stage == 0, stage == pp - 1
        if first:
            n += self.embedding_params(tp)
        if last:
            n += self.hidden
            if not self.tied or not first:
                n += self.embedding_params(tp)
        return n

    def largest_tensor(self, tp: int) -> int:
        """Elements of the biggest weight on a rank (its gradient is made whole before it is added
        into the fp32 buffer): the embedding / output shard, or an fc1 shard."""
        return max(self.embedding_params(tp), 2 * self.ffn * self.hidden // tp)


def resolve_model_config(cfg, model: str | None = None) -> dict:
    """The HF config dict `npr plan` uses: --model (a preset name or a folder), else model.hf_dir."""
    from ..checkpoint import read_hf_config

    if model is not None:
        if model.lower() in PRESETS:
            return dict(PRESETS[model.lower()])
        if not Path(model, "config.json").is_file():
            raise PlanInputError(f"--model {model}: neither a preset ({', '.join(PRESETS)}) nor a folder with "
                                 f"config.json")
        return read_hf_config(model)
    hf_dir = cfg.model.hf_dir
    if not Path(hf_dir, "config.json").is_file():
        raise PlanInputError(f"model.hf_dir={hf_dir}: no config.json there; give --model PATH or one of "
                             f"{', '.join(PRESETS)}")
    return read_hf_config(hf_dir)
