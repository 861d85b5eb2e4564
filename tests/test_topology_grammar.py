"""The grammar: a table of malformed inputs, fuzzing, and the strict/collecting agreement."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_npr.topology import REASONS, TopologyError, build_layout, find_defects, parse_structure
from npr_reference import ALPHABET, TAGS, dsl, engine_replay, prompt_and_response

VALID = "a G P a p P a p g S a s S a s K a k a"

# (dsl, expected reason, expected index, max_depth)
MALFORMED = [
    ("a S a s a", "tag_outside_block", 1, 1),
    ("a k", "tag_outside_block", 1, 1),
    ("G P a p g S a s K a k s", "tag_outside_block", 11, 1),
    ("G P a p g a S a s K a k", "missing_branch", 5, 1),
    ("G P a p g K a k", "missing_branch", 5, 1),
    ("G P a p P a p g S a s K a k", "steps_plans_mismatch", 11, 1),
    ("G P a p g S a s S a s K a k", "steps_plans_mismatch", 8, 1),
    ("G P a p P a p g S a s a S a s K a k", "text_between_branches", 11, 1),
    ("G P a p P a p g S a s _ S a s K a k", "text_between_branches", 11, 1),
    ("G P a p g S a s _ K a k", "text_between_branches", 8, 1),
    ("G P a p g S a s a", "missing_takeaway", 8, 1),
    ("G P a p P a p g S a s a", "missing_takeaway", 11, 1),
    ("G P a p P a p g S a s", "unclosed_block", 0, 1),
    ("G P a p g S a s G P a p g S a s K a k", "missing_takeaway", 8, 1),
    ("G P a p g S a", "unclosed_block", 5, 1),
    ("G P a p g S a s", "unclosed_block", 0, 1),
    ("G P a p g _", "unclosed_block", 0, 1),
    ("G P a p", "unclosed_block", 0, 1),
    ("G P a", "unclosed_block", 1, 1),
    ("G P a p g S a s K a", "unclosed_block", 8, 1),
    ("G P a p g S G P a p g S a s K a k s K a k", "nesting_too_deep", 6, 1),
    ("G P a p g S G P a p g S G P a p g S a s K a k s K a k s K a k", "nesting_too_deep", 12, 2),
    ("G P a p g S s K a k", "empty_branch", 5, 1),
    ("G P a p g S _ s K a k", "empty_branch", 5, 1),
    ("G P p g S a s K a k", "empty_plan", 1, 1),
    ("G P _ p g S a s K a k", "empty_plan", 1, 1),
    ("G P a p g S a s K _ k", "empty_takeaway", 8, 1),
    ("G a P a p g S a s K a k", "text_in_guideline", 1, 1),
    ("G g S a s K a k", "no_plans", 0, 1),
    ("G P a p g S a s K a k a G P a p g S a s K a k", "text_between_blocks", 11, 1),
    ("G P a p g S a K a k s", "unexpected_tag", 7, 1),
    ("G P a p g S a P s K a k", "unexpected_tag", 7, 1),
    ("G P a g S a s K a k", "unexpected_tag", 3, 1),
    ("G P a p S a s K a k", "unexpected_tag", 4, 1),
    ("G P a p g S a s K a G", "unexpected_tag", 10, 1),
    ("G P a p g S a s K a K k", "unexpected_tag", 10, 1),
]


def test_valid_baseline_parses():
    structure = parse_structure(dsl(VALID), TAGS)
    (block,) = structure.blocks
    assert (block.start, block.guideline_end, block.first_step, block.end) == (1, 9, 9, 18)
    assert block.plans == ((2, 5), (5, 8))
    assert [(b.start, b.end) for b in block.branches] == [(9, 12), (12, 15)]
    assert block.takeaway == (15, 18) and structure.rounds == 1 and structure.depth == 1
    assert find_defects(dsl(VALID), TAGS) == []


@pytest.mark.parametrize("text,reason,index,max_depth", MALFORMED)
def test_malformed_inputs_name_reason_and_index(text, reason, index, max_depth):
    ids = dsl(text)
    with pytest.raises(TopologyError) as err:
        parse_structure(ids, TAGS, max_depth=max_depth)
    assert (err.value.reason, err.value.index) == (reason, index), str(err.value)
    assert reason in REASONS
    with pytest.raises(TopologyError):
        build_layout(ids, TAGS, max_depth=max_depth)
    first = find_defects(ids, TAGS, max_depth=max_depth)[0]
    assert (first.reason, first.index) == (reason, index)


def test_nested_block_is_valid_with_depth_two():
    ids = dsl("G P a p g S G P a p g S a s K a k s K a k")
    structure = parse_structure(ids, TAGS, max_depth=2)
    assert structure.depth == 2
    assert [b.depth for b in structure.iter_blocks()] == [0, 1]


def test_missing_block_only_when_required():
    assert parse_structure(dsl("a a"), TAGS).blocks == ()
    with pytest.raises(TopologyError) as err:
        parse_structure(dsl("a a"), TAGS, response_start=1, require_block=True)
    assert (err.value.reason, err.value.index) == ("missing_block", 1)


def test_tags_in_the_prompt_are_text():
    ids = dsl("S a s k G") + dsl(VALID)
    with pytest.raises(TopologyError):
        parse_structure(ids, TAGS)
    structure = parse_structure(ids, TAGS, response_start=5)
    assert structure.blocks[0].start == 5 + 1


def test_whitespace_only_between_blocks_is_allowed():
    ids = dsl("G P a p g S a s K a k _ _ G P a p g S a s K a k a")
    structure = parse_structure(ids, TAGS)
    assert [b.start for b in structure.blocks] == [0, 13] and find_defects(ids, TAGS) == []
    with pytest.raises(TopologyError) as e:  # text there is not whitespace: a defect at its index
        parse_structure(dsl("G P a p g S a s K a k _ a G P a p g S a s K a k a"), TAGS)
    assert (e.value.reason, e.value.index) == ("text_between_blocks", 12)


def test_multiple_defects_are_all_collected():
    ids = dsl("G a P p g S s a S a s K k")
    reasons = [d.reason for d in find_defects(ids, TAGS)]
    assert reasons == ["text_in_guideline", "empty_plan", "empty_branch", "text_between_branches",
                       "steps_plans_mismatch", "empty_takeaway"]


def test_deep_adversarial_nesting_neither_recurses_nor_hangs():
    ids = dsl("G P a p g S" * 5000)
    with pytest.raises(TopologyError) as err:
        parse_structure(ids, TAGS)
    assert err.value.reason == "nesting_too_deep"
    defects = find_defects(ids, TAGS, max_depth=3)
    assert defects[0].reason == "nesting_too_deep"


def _mutate(ids, data):
    ids = list(ids)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["delete", "insert", "replace", "swap"]))
        i = data.draw(st.integers(0, max(len(ids) - 1, 0)))
        tok = dsl(data.draw(st.sampled_from(ALPHABET)))[0]
        if op == "delete" and ids:
            del ids[i]
        elif op == "insert":
            ids.insert(i, tok)
        elif op == "replace" and ids:
            ids[i] = tok
        elif op == "swap" and len(ids) > 1:
            j = data.draw(st.integers(0, len(ids) - 1))
            ids[i], ids[j] = ids[j], ids[i]
    return ids


def _assert_consistent(ids, response_start=0, max_depth=1):
    """Invalid -> TopologyError naming a known reason and an index inside the sequence, equal to
    the first collected defect; valid -> a layout equal to the engine replay."""
    defects = find_defects(ids, TAGS, response_start, max_depth)
    try:
        layout = build_layout(ids, TAGS, response_start, max_depth)
    except TopologyError as e:
        assert e.reason in REASONS and 0 <= e.index <= len(ids)
        assert (defects[0].reason, defects[0].index) == (e.reason, e.index)
        return False
    assert defects == []
    visible, pos = engine_replay(ids, response_start)
    assert torch.equal(layout.dense_mask(), visible) and torch.equal(layout.position_ids, pos)
    return True


@settings(max_examples=400)
@given(st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join), st.integers(1, 3))
def test_fuzz_random_sequences(text, max_depth):
    _assert_consistent(dsl(text), 0, max_depth)


@settings(max_examples=400)
@given(prompt_and_response(max_depth=2), st.data())
def test_fuzz_mutated_valid_sequences(sample, data):
    ids, response_start = sample
    _assert_consistent(_mutate(ids[response_start:], data), 0, max_depth=2)
