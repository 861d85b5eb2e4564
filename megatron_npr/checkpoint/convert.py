"""HF <-> Megatron distributed checkpoint conversion (the library behind tools/convert_hf.py).

hf-to-mcore runs tp*pp CPU ranks (gloo): each builds its stage of the model, fills it from the HF
safetensors one layer at a time and writes its shards; the result loads at any TP/PP.
mcore-to-hf loads the checkpoint into one process and streams HF shards out layer by layer.
Outputs appear only when complete (a temporary sibling folder renamed at the end).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ..io import atomic_output_dir
from ..models.qwen3_hf import CheckpointError, read_hf_config
from .hf_io import open_hf_weights, write_hf_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(hf_config: dict, requested: str | None) -> str:
    name = requested or hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; choose one of {sorted(DTYPES)}")
    return name


class WithNPRTokens(Mapping):
    """HF weights whose embedding (and untied output) rows for the NPR tags are initialised
    from the mean embedding of the tag name's sub-tokens, resized to `vocab_size` if needed."""

    def __init__(self, weights: Mapping, vocab_size: int, tag_rows: dict[int, list[int]]):
        self.weights, self.vocab_size, self.tag_rows = weights, vocab_size, tag_rows

    def __getitem__(self, name):
        tensor = self.weights[name]
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            return tensor
        out = torch.zeros(self.vocab_size, tensor.shape[1], dtype=tensor.dtype)
        out[:tensor.shape[0]] = tensor
        for row, sub_tokens in self.tag_rows.items():
            out[row] = tensor[sub_tokens].float().mean(0).to(tensor.dtype)
        return out

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)


def plan_npr_tokens(hf_dir: Path, hf_config: dict, tp: int):
    """(tokenizer with tags, new vocab size, {tag id: sub-token ids of its name})."""
    from ..data.tokenizer import load_tokenizer
    from ..topology import NPR_TAGS

    has_tokenizer = (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer_config.json").is_file()
    tokenizer, tags = load_tokenizer(hf_dir if has_tokenizer else None)
    vocab = hf_config["vocab_size"]
    rows = {}
    for tag in NPR_TAGS:
        sub = tokenizer.encode(tag.strip("<>"), add_special_tokens=False)
        if not sub or max(sub) >= vocab:
            raise CheckpointError(f"cannot initialise {tag}: the sub-tokens {sub} of its name are not in the "
                                  f"model's {vocab}-row embedding (is the tokenizer this model's?)")
        rows[tags[tag]] = sub
    needed = max(tags.ids) + 1
    if needed > vocab:  # Qwen3 checkpoints have spare rows; otherwise grow to a TP-friendly size
        multiple = 128 * tp
        vocab = -(-needed // multiple) * multiple
    return tokenizer, vocab, rows


def _hf_to_mcore_rank(rank: int, world: int, port: int, hf_dir: str, out_dir: str, tp: int, pp: int,
                      dtype: str, vocab: int, tag_rows: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    import warnings
    warnings.filterwarnings("ignore")
    from tqdm import tqdm

    from ..distributed import destroy_distributed, init_distributed
    from ..models import build_model, transformer_config_from_hf
    from .megatron_io import load_hf_into_model, save_dist_checkpoint

    hf_config = {**read_hf_config(hf_dir), "vocab_size": vocab}
    init_distributed(tp, pp)
    model = build_model(transformer_config_from_hf(hf_config, tp=tp, pp=pp, dtype=DTYPES[dtype]))
    progress = (lambda it: tqdm(it, desc=f"rank 0 of {world}: layers", unit="layer")) if rank == 0 else None
    with open_hf_weights(hf_dir) as weights:
        source = WithNPRTokens(weights, vocab, tag_rows) if tag_rows else weights
        load_hf_into_model(model, source, hf_config, progress=progress)
    save_dist_checkpoint(model, out_dir, {**hf_config, "torch_dtype": dtype})
    destroy_distributed()


def hf_to_mcore(hf_dir, out_dir, tp: int = 1, pp: int = 1, add_npr_tokens: bool = False,
                dtype: str | None = None) -> Path:
    """Write a Megatron distributed checkpoint of an HF Qwen3 folder; returns out_dir."""
    import torch.multiprocessing as mp

    from ..distributed import free_port
    from ..models import transformer_config_from_hf

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config = read_hf_config(hf_dir)
    dtype = checkpoint_dtype(hf_config, dtype)
    transformer_config_from_hf(hf_config, tp=tp, pp=pp)  # bad layouts fail here, before any work
    open_hf_weights(hf_dir).close()  # so do missing or corrupt weight files
    tokenizer, vocab, tag_rows = plan_npr_tokens(hf_dir, hf_config, tp) if add_npr_tokens else (None, None, {})
    vocab = vocab or hf_config["vocab_size"]
    with atomic_output_dir(out_dir) as tmp:
        try:
            mp.start_processes(_hf_to_mcore_rank, nprocs=tp * pp, start_method="spawn", args=(
                tp * pp, free_port(), str(hf_dir), str(tmp), tp, pp, dtype, vocab, tag_rows))
        except mp.ProcessRaisedException as e:
            raise CheckpointError(f"conversion failed on a worker: {str(e).strip().splitlines()[-1]}") from None
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            _copy_tokenizer(hf_dir, tmp)
    return out_dir


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def load_checkpoint_single(ckpt_dir, dtype: torch.dtype | None = None):
    """(model at TP=PP=1, hf_config) from a dist checkpoint, in this process."""
    from ..distributed import init_distributed
    from ..models import build_model, transformer_config_from_hf
    from .megatron_io import load_dist_checkpoint, read_checkpoint_config

    hf_config = read_checkpoint_config(ckpt_dir)
    saved = DTYPES[checkpoint_dtype(hf_config, None)]
    init_distributed(1, 1)
    model = build_model(transformer_config_from_hf(hf_config, dtype=saved))
    load_dist_checkpoint(model, ckpt_dir)
    return (model.to(dtype) if dtype else model), hf_config


def mcore_to_hf(ckpt_dir, out_dir, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write an HF folder (safetensors, config, tokenizer) from a dist checkpoint."""
    from tqdm import tqdm

    from .megatron_io import export_hf_from_model

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    model, hf_config = load_checkpoint_single(ckpt_dir)
    with atomic_output_dir(out_dir) as tmp:
        tensors = export_hf_from_model(model, hf_config)
        write_hf_weights(tmp, tqdm(tensors, desc="writing HF tensors", unit="tensor"), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        _copy_tokenizer(ckpt_dir, tmp)
    return out_dir


def _verification_batch(vocab: int, exclude: set[int], seed: int = 0):
    """Packed NPR rows (flat, two rounds, plain) with random ids: layouts come from synthetic tags,
    so any vocabulary works; ids whose rows may differ on purpose (NPR tags) are avoided."""
    from ..models import NPRBatch
    from ..topology import NPR_TAGS, PackSample, TagIds, build_layout, pack

    tags = TagIds.from_mapping({t: 10**9 + i for i, t in enumerate(NPR_TAGS)})  # never real token ids
    G, g, P, p, S, s, K, k = tags.ids
    text = [0] * 6
    shapes = [text + [G, P, 0, p, P, 0, p, g, S] + text + [s, S] + text * 2 + [s, K, 0, k] + text,
              text + [G, P, 0, p, g, S, 0, 0, s, K, 0, k] + [G, P, 0, p, P, 0, p, g, S, 0, s, S, 0, 0, s, K, 0, k] + text,
              text * 4]
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(vocab) if i not in exclude])
    samples = []
    for ids in shapes:
        tokens = allowed[torch.randint(0, len(allowed), (len(ids),), generator=gen)]
        samples.append(PackSample(tokens, torch.ones(len(ids), dtype=torch.bool), build_layout(ids, tags, 6)))
    return NPRBatch.from_rows(pack(samples, 256))


def verify(hf_dir, ckpt_dir, tol: float = 1e-4) -> dict:
    """Max |logits(HF) - logits(checkpoint)| in fp32 on NPR-structured batches."""
    from transformers import Qwen3ForCausalLM

    from ..models import forward_logits

    hf_config = read_hf_config(hf_dir)
    model, ckpt_config = load_checkpoint_single(ckpt_dir, dtype=torch.float32)
    hf = Qwen3ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
    vocab = min(hf_config["vocab_size"], ckpt_config["vocab_size"])
    exclude = set()
    if (Path(ckpt_dir) / "tokenizer.json").is_file():
        from ..data.tokenizer import load_tokenizer
        exclude = set(load_tokenizer(ckpt_dir)[1].ids)
    batch = _verification_batch(vocab, exclude)
    mask = torch.where(batch.dense_mask()[:, None], 0.0, torch.finfo(torch.float32).min)
    keep = torch.tensor([i for i in range(vocab) if i not in exclude])
    with torch.no_grad():
        ref = hf(input_ids=batch.tokens, attention_mask=mask, position_ids=batch.position_ids).logits[..., keep]
        ours = forward_logits(model.eval(), batch)[..., keep]
    diff = (ours - ref).abs().max().item()
    return {"max_abs_diff": diff, "tokens": int(batch.tokens.numel()), "tol": tol, "ok": diff <= tol}
