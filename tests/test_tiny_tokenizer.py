"""The tiny pipeline's own tokenizer (data.tiny_tokenizer): small, Qwen-shaped, and everything the
NPR stages need from a tokenizer holds on it."""
import json

import pytest

from megatron_npr.data.prompts import NPR_INSTRUCTION, chat_prompt_text
from megatron_npr.data.synth import make_synth_dataset
from megatron_npr.data.tiny_tokenizer import (
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_tiny_tokenizer,
    check_tokenizer,
    write_tiny_tokenizer,
)
from megatron_npr.data.tokenizer import NPRVocab, load_tokenizer, load_vocab
from megatron_npr.topology import NPR_TAGS, branch_label, parse_structure

QUESTION = "Let A = 3 + 4 and B = 5 + 2. What is A + B?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny") / "tokenizer")


@pytest.fixture(scope="module")
def tiny(folder):
    return load_tokenizer(folder)


def test_small_vocabulary_with_special_tokens_and_tags_kept(folder, tiny):
    from transformers import AutoTokenizer
    tokenizer, tags = tiny
    assert len(tokenizer) == VOCAB_SIZE <= 2048
    assert len(AutoTokenizer.from_pretrained(str(folder))) == VOCAB_SIZE  # load_tokenizer added nothing
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tags.ids == tuple(range(3, 11))  # the tags' own ids, not appended ones
    for tag, i in tags.as_dict().items():
        assert tokenizer.encode(tag, add_special_tokens=False) == [i]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", "<|endoftext|>", 0)


def test_texts_round_trip(tiny):
    tokenizer, _ = tiny
    texts = [NPR_INSTRUCTION, chat_prompt_text(QUESTION, tokenizer), "héllo wörld 日本 🙂\t\r\n  x\\boxed{}",
             "<guideline>\n<plan>1: a</plan>\n</guideline><step>1: b</step><takeaway>c</takeaway> \\boxed{7}"]
    for parts, digits in (((1, 3), 1), ((2, 8), 2), ((4, 12), 3)):
        for problem, solution in make_synth_dataset(30, parts, digits, seed=digits):
            texts += [problem.question, solution]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_task_words_are_single_tokens_as_in_qwen3(tiny):
    tokenizer, _ = tiny
    _, solution = make_synth_dataset(1)[0]
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(solution, add_special_tokens=False)]
    assert " Compute" in pieces and " answer" in pieces and "boxed" in pieces
    assert all(len(p) == 1 for p in pieces if p.strip().isdigit())  # numbers digit by digit, like Qwen3


def test_chat_template_is_qwen_style_without_thinking(tiny):
    tokenizer, _ = tiny
    assert chat_prompt_text(QUESTION, tokenizer, "") == \
        f"<|im_start|>user\n{QUESTION}\n\n<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"


def test_branch_labels_tokenize_as_the_engine_inserts_them(tiny):
    tokenizer, tags = tiny

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    for j in range(1, 9):
        assert encode(f"<step>{branch_label(j)} x")[:1 + len(encode(branch_label(j)))] == \
            [tags["<step>"]] + encode(branch_label(j))
    vocab = NPRVocab(tokenizer, tags)
    _, solution = make_synth_dataset(1, (8, 8))[0]
    ids = encode(solution)
    block = parse_structure(ids, tags).blocks[0]
    assert len(block.branches) == 8
    for j, branch in enumerate(block.branches, 1):
        label = vocab.label_ids(j)
        assert ids[branch.start + 1:branch.start + 1 + len(label)] == label


def test_whitespace_tokens_and_vocab(folder, tiny):
    tokenizer, tags = tiny
    for text in (" ", "\n"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] in tags.space_ids, text
    vocab = load_vocab(tokenizer_dir=folder)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert vocab.end_of_turn_id == im_end and vocab.eos_ids == {im_end} and vocab.pad_id == 0
    assert vocab.decode(vocab.prompt_ids(QUESTION, "")) == chat_prompt_text(QUESTION, tokenizer, "")


def test_build_is_deterministic(folder, tmp_path):
    again = write_tiny_tokenizer(tmp_path / "again")
    assert json.loads((again / "tokenizer.json").read_text()) == json.loads((folder / "tokenizer.json").read_text())


def test_check_catches_a_label_that_merges_with_its_context(tmp_path):
    """Negative control: byte-level BPE without Qwen's pre-tokenizer split learns merges such as
    ':Ġ' across the label's boundary, so `<step>1: x` no longer starts with encode('1:')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    texts = [s for _, s in make_synth_dataset(300)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|im_end|>", *NPR_TAGS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                            additional_special_tokens=list(NPR_TAGS)).save_pretrained(tmp_path)
    tokenizer, _ = load_tokenizer(tmp_path)  # the tags alone are fine ...
    with pytest.raises(ValueError, match="the label is not encode"):
        check_tokenizer(tokenizer, texts)  # ... but the branch labels are not
    check_tokenizer(build_tiny_tokenizer(texts), texts)  # the same corpus with Qwen's split passes


def test_check_catches_a_tag_that_is_not_one_token(folder):
    """Negative control: the same tokenizer without `<step>` among its tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = (folder / "tokenizer.json").read_text().replace('"<step>"', '"<stepX>"')
    broken = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spec), eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="<step> encodes to"):
        check_tokenizer(broken)
