"""A small Qwen-style tokenizer for tiny runs, built offline with `tokenizers`.

With the real Qwen3 tokenizer a tiny model's output layer has 151,680 rows and costs ~30x the rest
of the model on a CPU. This one has 512 tokens and the same shape as Qwen3's:

- byte-level BPE behind Qwen's pre-tokenizer regex (every digit its own pre-token, `" ?punct"`,
  `" ?word"`), so any text round-trips through its 256 byte tokens, numbers are written digit by
  digit, and `"j:"` followed by a space tokenizes exactly as `encode("j:")` (the branch-label
  property the engine relies on);
- merges trained on the synthetic task's texts (questions, canonical NPR solutions) and the NPR
  instruction, so the task's words are single tokens as they are in Qwen3;
- special tokens `<|endoftext|>` (pad, id 0), `<|im_start|>`, `<|im_end|>` (eos and end of turn)
  and the eight NPR tags (ids 3-10);
- a Qwen-style chat template without a system default and with thinking off:
  `<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n`.

Training is deterministic: the same corpus gives the same tokenizer.json.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from ..io import atomic_output_dir
from ..topology import NPR_TAGS

VOCAB_SIZE = 512
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, *NPR_TAGS)

# Qwen2/Qwen3's pre-tokenizer regex (tokenizer.json of the real tokenizer)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def default_corpus() -> list[str]:
    """The synthetic task's texts (user turns and canonical solutions, 1-8 parts, 1-3 digits), the
    NPR instruction and the chat roles: what the tiny pipeline's model reads and writes."""
    from .prompts import NPR_INSTRUCTION
    from .synth import make_problem

    rng = random.Random(0)
    texts = [f"user\n{NPR_INSTRUCTION}\n", "system\n"]
    for i in range(600):
        problem, solution = make_problem(rng, i, (1, 8), 1 + i % 3)
        texts += [f"user\n{problem.question}\n\n", "\nassistant\n", solution]
    return texts


def build_tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = VOCAB_SIZE):
    """The tokenizer as a `transformers.PreTrainedTokenizerFast` (not written anywhere)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(default_corpus() if corpus is None else corpus)
    if not texts:
        raise ValueError("write_tiny_tokenizer: the corpus is empty")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, unk_token=None,
                                   additional_special_tokens=[IM_START, *NPR_TAGS], chat_template=CHAT_TEMPLATE,
                                   model_max_length=1 << 20, clean_up_tokenization_spaces=False)


def check_tokenizer(tokenizer, texts: Iterable[str] = ()) -> None:
    """Raise ValueError unless `tokenizer` (with the NPR tags, as load_tokenizer returns it) has
    what the NPR stages need: each tag one token, `<|im_end|>` one token, whitespace-only tokens,
    every branch label j = 1..8 written after `<step>` and followed by a space tokenizing exactly
    as `encode(branch_label(j))` (what the engine inserts), and every text round-tripping."""
    from ..topology import branch_label
    from .tokenizer import whitespace_token_ids

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    for token in (*NPR_TAGS, IM_END):
        if len(encode(token)) != 1:
            raise ValueError(f"{token} encodes to {encode(token)}, not one token")
    if not whitespace_token_ids(tokenizer):
        raise ValueError("the tokenizer has no whitespace-only token")
    step = encode("<step>")
    for j in range(1, 9):
        label, ids = branch_label(j), encode(f"<step>{branch_label(j)} x")
        if ids[:1 + len(encode(label))] != step + encode(label):
            raise ValueError(f"'<step>{label} x' encodes to {ids}: the label is not encode({label!r}) = "
                             f"{encode(label)}")
    for text in texts:
        back = tokenizer.decode(encode(text), skip_special_tokens=False)
        if back != text:
            raise ValueError(f"{text[:60]!r} does not round-trip: decodes to {back[:60]!r}")


def write_tiny_tokenizer(out_dir: str | Path, corpus: Iterable[str] | None = None,
                         vocab_size: int = VOCAB_SIZE) -> Path:
    """Build the tiny tokenizer (default corpus: `default_corpus()`), check it (`check_tokenizer`
    on the corpus) and save it as an HF tokenizer folder at `out_dir` (atomically; `out_dir` must
    not be a non-empty folder). Load it with `data.tokenizer.load_tokenizer(out_dir)` or
    `AutoTokenizer.from_pretrained(out_dir)`."""
    texts = list(default_corpus() if corpus is None else corpus)
    tokenizer = build_tiny_tokenizer(texts, vocab_size)
    check_tokenizer(tokenizer, texts)
    with atomic_output_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
