"""The text-level format reward: each defect, several defects, and agreement with the parser."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_npr.topology import TopologyError, find_defects, format_reward, parse_structure
from megatron_npr.topology.text import SEVERITY, last_boxed
from npr_reference import ALPHABET, response

VALID = ("Two independent parts.<guideline>\n<plan>1: add</plan>\n<plan>2: multiply</plan>\n</guideline>"
         "<step>1: 2+3=5</step><step>2: 2*3=6</step><takeaway>5+6=11</takeaway>\nSo \\boxed{11}.")

# (name, text, expected reasons)
SINGLE_DEFECTS = [
    ("missing block", "Just 11. \\boxed{11}", ["missing_block"]),
    ("mismatch", VALID.replace("<step>2: 2*3=6</step>", ""), ["steps_plans_mismatch"]),
    ("text between branches", VALID.replace("</step><step>", "</step>\n<step>"), ["text_between_branches"]),
    ("empty branch", VALID.replace("2: 2*3=6", ""), ["empty_branch"]),
    ("empty plan", VALID.replace("2: multiply", " "), ["empty_plan"]),
    ("empty takeaway", VALID.replace("5+6=11", ""), ["empty_takeaway"]),
    ("text in guideline", VALID.replace("</plan>\n<plan>", "</plan> and <plan>"), ["text_in_guideline"]),
    ("stray tag", VALID.replace("So \\boxed", "So </step> \\boxed"), ["tag_outside_block"]),
    ("missing answer", VALID.replace("So \\boxed{11}.", "So eleven."), ["missing_answer"]),
    ("empty answer", VALID.replace("\\boxed{11}", "\\boxed{ }"), ["empty_answer"]),
    ("answer only inside the takeaway", VALID.replace("5+6=11", "\\boxed{11}").replace("So \\boxed{11}.", "Done."),
     ["missing_answer"]),
    ("unclosed block", VALID[:VALID.index("<takeaway>")], ["unclosed_block", "missing_answer"]),
    ("nesting", VALID.replace("2: 2*3=6", "2: <guideline><plan>1: x</plan></guideline><step>1: y</step>"
                              "<takeaway>z</takeaway>"), ["nesting_too_deep"]),
]


def test_valid_text_scores_exactly_zero():
    result = format_reward(VALID)
    assert result.score == 0.0 and result.valid and result.reasons == ()


@pytest.mark.parametrize("name,text,reasons", SINGLE_DEFECTS, ids=[c[0] for c in SINGLE_DEFECTS])
def test_each_defect_is_named_and_penalised(name, text, reasons):
    result = format_reward(text)
    assert list(result.reasons) == reasons
    weight = sum(SEVERITY[r] for r in reasons)
    assert -2 < result.score < 0 and result.score == pytest.approx(-2 * math.tanh(weight / 2))
    assert all(0 <= d.index <= len(text) for d in result.defects)


def test_penalty_grows_with_number_and_severity_of_defects():
    light = format_reward(VALID.replace("</plan>\n<plan>", "</plan> and <plan>"))
    two = format_reward(VALID.replace("</plan>\n<plan>", "</plan> and <plan>").replace("5+6=11", ""))
    three = format_reward(VALID.replace("</plan>\n<plan>", "</plan> and <plan>").replace("5+6=11", "")
                          .replace("\\boxed{11}", "eleven"))
    severe = format_reward("no structure at all")
    assert 0 > light.score > two.score > three.score > -2
    assert severe.score < format_reward(VALID.replace("</step><step>", "</step>\n<step>")).score
    assert len(three.reasons) == 3


def test_last_boxed_handles_nested_braces():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None
    assert last_boxed("nothing") is None


_WORDS = {"a": ["x", "Compute 3+4", "so", "\\frac12", "<|im_end|>", "<step", "Plan"],
          "_": ["\n", " ", "\n\n", "  "]}
_TAG = {"G": "<guideline>", "g": "</guideline>", "P": "<plan>", "p": "</plan>",
        "S": "<step>", "s": "</step>", "K": "<takeaway>", "k": "</takeaway>"}


def _render(dsl_text, data):
    return "".join(_TAG[c] if c in _TAG else data.draw(st.sampled_from(_WORDS[c])) for c in dsl_text)


@settings(max_examples=150)
@given(st.one_of(response(max_depth=1).map(lambda r: r + "a"),
                 st.lists(st.sampled_from(ALPHABET), max_size=30).map("".join)), st.data())
def test_text_and_token_levels_agree(qwen, dsl_text, data):
    """format_reward (text) and parse_structure (Qwen3 token ids) agree on validity and on the
    first defect's reason, for valid structures and random tag soup."""
    tokenizer, tags = qwen
    text = _render(dsl_text, data) + " \\boxed{7}"
    result = format_reward(text)
    ids = tokenizer.encode(text, add_special_tokens=False)
    structural = [r for r in result.reasons if r not in ("missing_answer", "empty_answer")]
    try:
        parse_structure(ids, tags, require_block=True)
        token_reason = None
    except TopologyError as e:
        token_reason = e.reason
    assert (structural[0] if structural else None) == token_reason
    if not structural:
        assert find_defects(ids, tags, require_block=True) == []
