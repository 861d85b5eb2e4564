"""Tokenizer loading and TagIds."""
import pytest

from megatron_npr.data.tokenizer import load_tokenizer
from megatron_npr.topology import NPR_TAGS, Kind, TagIds


def test_default_qwen3_tokenizer_has_single_token_tags(qwen):
    tokenizer, tags = qwen
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]  # real Qwen3 vocab
    assert tags.ids == tuple(range(151669, 151677))
    for tag in NPR_TAGS:
        assert tokenizer.encode(tag, add_special_tokens=False) == [tags[tag]]
    ids = tokenizer.encode("<step>1: x</step>", add_special_tokens=False)
    assert ids[0] == tags["<step>"] and ids[-1] == tags["</step>"]


def test_whitespace_ids_are_exactly_whitespace(qwen):
    tokenizer, tags = qwen
    for text in ["\n", "\n\n", " ", "    ", "\t"]:
        assert set(tokenizer.encode(text, add_special_tokens=False)) <= tags.space_ids, repr(text)
    for text in ["a", " x", ".", "<|im_end|>", "<step>"]:
        assert not set(tokenizer.encode(text, add_special_tokens=False)) & tags.space_ids, repr(text)
    assert tags.kinds(tokenizer.encode("\n<plan>x", add_special_tokens=False))[:2] == [Kind.SPACE, Kind.PLAN_O]


def test_saved_tokenizer_with_tags_keeps_their_ids(qwen, tmp_path):
    tokenizer, tags = qwen
    tokenizer.save_pretrained(tmp_path)
    _, again = load_tokenizer(tmp_path)
    assert again == tags


def test_bad_tokenizer_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_tag_ids_from_mapping_validates():
    mapping = {t: 10 + i for i, t in enumerate(NPR_TAGS)}
    tags = TagIds.from_mapping(mapping, space_ids=[3])
    assert tags.as_dict() == mapping and tags["</step>"] == 15
    with pytest.raises(KeyError, match="not an NPR tag"):
        tags["<think>"]
    with pytest.raises(ValueError, match="missing tags"):
        TagIds.from_mapping({t: i for i, t in enumerate(NPR_TAGS[:-1])})
    with pytest.raises(ValueError, match="distinct"):
        TagIds.from_mapping({t: 1 for t in NPR_TAGS})
    with pytest.raises(ValueError, match="both tags and whitespace"):
        TagIds.from_mapping(mapping, space_ids=[10])
    with pytest.raises(ValueError, match="non-negative"):
        TagIds.from_mapping({**mapping, "<step>": -1})
