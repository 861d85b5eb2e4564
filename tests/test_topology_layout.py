"""Positions and masks of valid structures against an independent replay of the engine."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_npr.topology import Layout, build_layout, critical_path_length, parse_structure
from npr_reference import TAGS, dsl, engine_replay, prompt_and_response


def _check(ids, response_start, max_depth):
    layout = build_layout(ids, TAGS, response_start, max_depth)
    visible, pos = engine_replay(ids, response_start)
    assert torch.equal(layout.position_ids, pos)
    assert torch.equal(layout.dense_mask(), visible)
    return layout


@settings(max_examples=300)
@given(prompt_and_response(max_depth=1))
def test_flat_blocks_match_engine_replay(sample):
    ids, response_start = sample
    _check(ids, response_start, max_depth=1)


@settings(max_examples=200)
@given(prompt_and_response(max_depth=2))
def test_nested_blocks_match_engine_replay(sample):
    ids, response_start = sample
    layout = _check(ids, response_start, max_depth=2)
    assert layout.depth == 2


@settings(max_examples=100)
@given(prompt_and_response(max_depth=1), st.sampled_from(["leak_siblings", "takeaway_after_sum"]))
def test_negative_control_wrong_rules_are_caught(sample, rule):
    """A replay with a deliberately wrong rule disagrees whenever a block has 2+ branches."""
    ids, response_start = sample
    structure = parse_structure(ids, TAGS, response_start)
    layout = build_layout(ids, TAGS, response_start)
    visible, pos = engine_replay(ids, response_start, **{rule: True})
    multi = any(len(b.branches) >= 2 for b in structure.blocks)
    agrees = torch.equal(layout.dense_mask(), visible) and torch.equal(layout.position_ids, pos)
    assert agrees != multi


def test_worked_example_by_hand():
    # prompt Q A | <guideline><plan>a</plan><plan>b</plan></guideline>\n <step>x</step><step>y z</step>
    # <takeaway>t</takeaway> answer
    ids = dsl("aa G P a p P a p g _ S a s S a a s K a k a")
    layout = build_layout(ids, TAGS, response_start=2)
    # g = position of '_' (index 10) = 10; branches start at 11; longest branch spans 4 -> takeaway 15
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 11, 12, 13, 14,
                                            15, 16, 17, 18]
    mask = layout.dense_mask()
    assert mask[15].nonzero().flatten().tolist() == list(range(0, 11)) + [14, 15]  # 'a' of branch 2
    assert mask[18, :19].all() and not mask[18, 19:].any()  # takeaway sees everything before it
    assert layout.hole_lo[0, 15] == 11 and layout.hole_hi[0, 15] == 14
    # 20 response tokens, the 3-token first branch runs beside the second: 17 sequential steps
    assert critical_path_length(layout, response_start=2) == 17


def test_empty_holes_and_causal_layout():
    layout = Layout.causal(5, depth=2)
    assert torch.equal(layout.dense_mask(), torch.ones(5, 5, dtype=torch.bool).tril())
    plain = build_layout(dsl("aaa"), TAGS)
    assert torch.equal(plain.dense_mask(), layout.dense_mask()[:3, :3])
    assert torch.equal(plain.hole_lo, plain.hole_hi)


def test_layout_checks_shapes_and_depth():
    lay = build_layout(dsl("a G P a p g S a s K a k"), TAGS)
    with pytest.raises(ValueError, match="shapes"):
        Layout(lay.position_ids, lay.doc_start[:-1], lay.hole_lo, lay.hole_hi)
    with pytest.raises(ValueError, match="shrink"):
        lay.with_depth(2).with_depth(1)
    assert torch.equal(lay.with_depth(3).dense_mask(), lay.dense_mask())
    with pytest.raises(ValueError, match="max_depth"):
        build_layout(dsl("a"), TAGS, max_depth=0)
    with pytest.raises(ValueError, match="response_start"):
        build_layout(dsl("a"), TAGS, response_start=5)
