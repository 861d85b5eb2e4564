"""Canonicalisation of SFT text into the form the engine produces."""
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_npr.topology import branch_label, canonicalize, format_reward, parse_structure

LOOSE = ("Two parts.\n<guideline>\n<plan>1. add the numbers</plan>\n<plan>Plan 2: multiply</plan>\n</guideline>\n"
         "<step>\n1: 2+3=5</step>\n<step>2:2*3=6\n</step>\n<takeaway>5+6=11</takeaway>\nSo \\boxed{11}.")
CANONICAL = ("Two parts.\n<guideline>\n<plan>1: add the numbers</plan>\n<plan>2: multiply</plan>\n</guideline>"
             "<step>1: 2+3=5</step><step>2: 2*3=6\n</step><takeaway>5+6=11</takeaway>\nSo \\boxed{11}.")


def test_loose_form_becomes_canonical_and_changes_are_reported():
    result = canonicalize(LOOSE)
    assert result.text == CANONICAL
    assert format_reward(LOOSE).reasons == ("text_between_branches",) * 2
    assert format_reward(result.text).valid
    joined = "\n".join(result.changes)
    assert "between </guideline> and <step>" in joined and "between </step> and <takeaway>" in joined
    assert "plan 1: '1. ' -> '1: '" in joined and "plan 2: 'Plan 2: ' -> '2: '" in joined
    assert len(result.changes) == 7


def test_canonical_text_is_a_fixed_point():
    again = canonicalize(CANONICAL)
    assert again.text == CANONICAL and again.changes == []


def test_branches_follow_their_plans_when_labels_are_permuted():
    text = ("<guideline><plan>1: a</plan><plan>2: b</plan><plan>3: c</plan></guideline>"
            "<step>3: C</step><step>1: A</step><step>2: B</step><takeaway>t</takeaway> \\boxed{1}")
    result = canonicalize(text)
    assert "<step>1: A</step><step>2: B</step><step>3: C</step>" in result.text
    assert any("reordered" in c for c in result.changes)


def test_missing_labels_are_added_in_order_including_nested_blocks():
    text = ("<guideline><plan>a</plan><plan>b</plan></guideline><step>A</step><step><guideline><plan>x"
            "</plan></guideline><step>X</step><takeaway>y</takeaway></step><takeaway>t</takeaway> \\boxed{1}")
    result = canonicalize(text)
    assert result.text == (
        "<guideline><plan>1: a</plan><plan>2: b</plan></guideline><step>1: A</step><step>2:<guideline>"
        "<plan>1: x</plan></guideline><step>1: X</step><takeaway>y</takeaway></step><takeaway>t</takeaway>"
        " \\boxed{1}")
    assert format_reward(result.text, max_depth=2).valid


def test_labels_tokenize_exactly_as_the_engine_writes_them(qwen):
    """After each <step> of canonical text come the ids of branch_label(j); the loose form fails."""
    tokenizer, tags = qwen

    def label_ids_after_steps(text):
        ids = tokenizer.encode(text, add_special_tokens=False)
        block = parse_structure(ids, tags).blocks[0]
        return [ids[b.start + 1:b.start + 1 + len(tokenizer.encode(branch_label(j)))]
                for j, b in enumerate(block.branches, 1)]

    expected = [tokenizer.encode(branch_label(j)) for j in (1, 2)]
    assert label_ids_after_steps(CANONICAL) == expected
    loose_but_parseable = CANONICAL.replace("<step>2: 2*3", "<step>2:2*3").replace("<step>1: ", "<step>\n1: ")
    assert label_ids_after_steps(loose_but_parseable) != expected


@settings(max_examples=200)
@given(st.lists(st.sampled_from(["<guideline>", "</guideline>", "<plan>", "</plan>", "<step>", "</step>",
                                 "<takeaway>", "</takeaway>", "1: ", "2. ", "x", "\n", " "]), max_size=30))
def test_any_text_is_handled_and_canonical_form_is_stable(pieces):
    once = canonicalize("".join(pieces))
    twice = canonicalize(once.text)
    assert twice.text == once.text
