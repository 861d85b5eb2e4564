"""The math correctness reward: answer extraction, equivalences, and a pool that survives bad inputs."""
import os
import threading
import time

import pytest

from megatron_npr.rewards import MathGrader, extract_answer, grade_exact_int, grade_one

TIMEOUT_S = 2  # short math-verify timeouts keep the pathological cases quick


def boxed(answer: str) -> str:
    return f"Some reasoning first.\nSo the answer is \\boxed{{{answer}}}."


# (gold, boxed answer, expected): math-verify equivalences the reward relies on.
EQUIVALENCES = [
    (r"\frac12", "0.5", True),
    ("0.5", r"\frac12", True),
    ("(1,3]", "(1,3]", True),
    ("(1,3]", "(1,3)", False),
    (r"\{1,2,3\}", r"\{3,2,1\}", True),
    ("x=3", "3", True),
    (r"18\text{ dollars}", "18", True),
    (r"90^\circ", "90", True),
    ("2,-2", "-2,2", True),
    ("2,-2", "2", False),
    (r"(3,\frac{\pi}{2})", r"(3,\pi/2)", True),
    (r"\sqrt2/2", r"\frac{\sqrt2}{2}", True),
    ("27.0", "27", True),
    (r"\text{(C)}", "C", True),
    (r"10\%", "10", True),
    ("1,000", "1000", True),
    ("5", "6", False),
    # Raw LaTeX golds: right only because the gold is wrapped in $...$ (see the control below).
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)", True),
    (r"\left( 3, \frac{\pi}{2} \right)", "3", False),
    (r"\dfrac{14}{3}", "14/3", True),
    (r"\dfrac{14}{3}", r"\frac{14}{3}", True),
    (r"$\dfrac{14}{3}$", r"\frac{14}{3}", True),
]


@pytest.fixture(scope="module")
def grader():
    with MathGrader(workers=2, timeout_s=TIMEOUT_S) as math_grader:
        yield math_grader


def test_equivalences_in_one_batch(grader):
    golds = [gold for gold, _, _ in EQUIVALENCES]
    predictions = [boxed(answer) for _, answer, _ in EQUIVALENCES]
    results = grader.grade(predictions, golds)
    wrong = [(gold, answer) for (gold, answer, expected), got in zip(EQUIVALENCES, results) if got != expected]
    assert not wrong, f"graded wrongly: {wrong}"


def test_raw_latex_gold_fails_without_dollar_wrapping():
    # The negative control: unwrapped, math-verify reads the tuple as 3 and the fraction as nothing.
    from math_verify import parse, verify
    assert not verify(parse(r"\left( 3, \frac{\pi}{2} \right)"), parse(r"$\boxed{(3,\pi/2)}$"))
    assert verify(parse(r"\left( 3, \frac{\pi}{2} \right)"), parse(r"$\boxed{3}$"))
    assert parse(r"\dfrac{14}{3}") == []
    assert grade_one(boxed(r"(3,\pi/2)"), r"\left( 3, \frac{\pi}{2} \right)")
    assert grade_one(boxed("14/3"), r"\dfrac{14}{3}")


@pytest.mark.parametrize("text, expected", [
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"first \boxed{1}, then \boxed {2}, finally \fbox{3}.", "3"),
    (r"\boxed{a} and \boxed{\boxed{b}}", r"\boxed{b}"),
    (r"\boxed{5} then \boxed{6", "5"),
    (r"\boxed{6", None),
    ("no box at all: 42", None),
    (r"\boxed{}", ""),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_no_box_is_wrong_and_bad_output_never_raises():
    assert not grade_one("The answer is 5.", "5")
    assert not grade_one(boxed(r"\frac{3"), "3")
    assert not grade_one(boxed("}}{{\\\\"), "3")
    assert not grade_one(boxed("5"), "")


def test_long_answers_are_cut_to_max_chars():
    assert grade_one(boxed("7" + " " * 600 + "+1"), "7")
    assert not grade_one(boxed("7" + " " * 600 + "+1"), "7", max_chars=1000)


def test_grade_one_refuses_other_threads():
    errors = []

    def call():
        try:
            grade_one(boxed("1"), "1")
        except RuntimeError as error:
            errors.append(error)

    worker = threading.Thread(target=call)
    worker.start()
    worker.join()
    assert len(errors) == 1


def test_pathological_prediction_times_out_and_grader_recovers(grader):
    start = time.monotonic()
    assert grader.grade([boxed("9^{9^{9^9}}")], ["1"]) == [False]
    assert time.monotonic() - start < TIMEOUT_S + MathGrader.WALL_MARGIN_S + 3
    assert grader.grade([boxed("4"), boxed("(" * 200 + "1" + ")" * 200)], ["4", "1"]) == [True, False]
    assert grader.grade([boxed("2+2")], ["4"]) == [True]


def test_exact_int():
    assert grade_exact_int(boxed("42"), "42")
    assert grade_exact_int(boxed(" -7 "), -7)
    assert grade_exact_int(boxed("$12$"), "12")
    assert not grade_exact_int(boxed("42"), "43")
    assert not grade_exact_int(boxed("42.0"), "42")
    assert not grade_exact_int(boxed("6*7"), "42")
    assert not grade_exact_int("42", "42")
    assert not grade_exact_int(boxed("42"), "forty-two")


@pytest.mark.parametrize("answer, gold, expected", [
    ("C", "C", True), ("c", "C", True), ("(B)", "B", True), (r"\text{(D)}", "D", True),
    (r"\textbf{A}", "A", True), ("E.", "E", True), ("A", "B", False), ("(C) 42", "C", False),
])
def test_multiple_choice_letters(answer, gold, expected):
    assert grade_one(boxed(answer), gold) is expected


def test_mismatched_lengths_raise(grader):
    with pytest.raises(ValueError):
        grader.grade([boxed("1"), boxed("2")], ["1"])
    assert grader.grade([], []) == []


def scripted_grade(prediction_text, gold, *, max_chars, timeout_s):
    """Runs in the workers: "hang" and "crash" misbehave as a stuck or dying worker would."""
    if prediction_text == "hang":
        time.sleep(120)
    if prediction_text == "crash":
        os._exit(1)
    return grade_one(prediction_text, gold, max_chars=max_chars, timeout_s=timeout_s)


def test_stuck_and_dead_workers_cost_only_their_own_item():
    with MathGrader(workers=2, timeout_s=1, grade_fn=scripted_grade) as scripted:
        start = time.monotonic()
        results = scripted.grade(["hang", boxed("1"), boxed("2"), boxed("3")], ["1", "1", "2", "4"])
        assert results == [False, True, True, False]
        assert time.monotonic() - start < 1 + MathGrader.WALL_MARGIN_S + 5
        results = scripted.grade([boxed("1"), "crash", boxed("2"), boxed("3")], ["1", "1", "2", "3"])
        assert results == [True, False, True, True]
        assert scripted.grade([boxed("5")], ["5"]) == [True]
