"""Problem readers, the NPR prompt, and the synthetic task."""
import json
from pathlib import Path

import pytest

from megatron_npr.cli import main
from megatron_npr.data.problems import ProblemFormatError, load_problems
from megatron_npr.data.prompts import NPR_INSTRUCTION, chat_prompt_text, prompt_ids
from megatron_npr.data.synth import make_synth_dataset
from megatron_npr.topology import canonicalize, format_reward, parse_structure

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent: these tests read the shared "
                                  "ORZ subset and benchmark files; place them there to run them")

BENCHMARKS = [("AIME25/aime25.json", 30, "70"), ("AMC23/amc23.json", 40, "27.0"),
              ("HMMT_Feb_2025/hmmt_feb_2025.json", 30, "103"), ("MATH500/math500.json", 500, None),
              ("GPQA_Diamond/gpqa_diamond_processed.json", 198, "D")]


@needs_shared
@pytest.mark.parametrize("path,count,first_answer", BENCHMARKS)
def test_benchmark_files_load(path, count, first_answer):
    problems = load_problems(SHARED / "benchmarks" / path)
    assert len(problems) == count and len({p.id for p in problems}) == count
    assert all(p.question and p.answer for p in problems)
    if first_answer:
        assert problems[0].answer == first_answer
    if "GPQA" in path:
        assert {p.answer for p in problems} <= set("ABCD")


@needs_shared
def test_orz_collection_loads():
    files = sorted((SHARED / "orz").glob("*.json"))
    assert files
    problems = [p for f in files for p in load_problems(f)]
    assert len(problems) == 4510  # the shared subset
    assert all(p.question and p.answer for p in problems)


def test_bad_records_name_file_and_index(tmp_path, caplog):
    bad = tmp_path / "orz.json"
    good = [{"from": "human", "value": "1+1?"}, {"from": "assistant", "ground_truth": {"value": "2"}}]
    bad.write_text(json.dumps([good, [{"from": "human", "value": "no answer"}, {"from": "assistant"}], good]))
    with pytest.raises(ProblemFormatError, match=r"orz.json: record 1: missing assistant"):
        load_problems(bad)
    assert [p.id for p in load_problems(bad, skip_bad=True)] == ["orz-0", "orz-2"]
    assert "skipped 1 bad record" in caplog.text
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ProblemFormatError, match="broken.json: invalid JSON"):
        load_problems(tmp_path / "broken.json")
    (tmp_path / "b.jsonl").write_text('{"problem": "p", "answer": 3}\n{"question": "q"}\n')
    with pytest.raises(ProblemFormatError, match="b.jsonl: record 1: missing 'answer'"):
        load_problems(tmp_path / "b.jsonl")


def test_prompt_is_the_chat_template_with_the_instruction(qwen):
    tokenizer, tags = qwen
    text = chat_prompt_text("What is 2+3?", tokenizer)
    assert text.startswith("<|im_start|>user\nWhat is 2+3?\n\n") and NPR_INSTRUCTION in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking mode off
    ids = prompt_ids("What is 2+3?", tokenizer)
    assert tags["<step>"] in ids  # the instruction quotes the tags; as prompt text they are ignored
    parse_structure(ids, tags, response_start=len(ids))


def test_synthetic_problems_and_solutions(qwen):
    tokenizer, tags = qwen
    pairs = make_synth_dataset(50, parts=(2, 4), digits=1, seed=3)
    assert [p.question for p, _ in pairs] == [p.question for p, _ in make_synth_dataset(50, (2, 4), 1, 3)]
    for problem, solution in pairs:
        sums = problem.question.split("Let ")[1].split(". What")[0].replace(" and ", ", ").split(", ")
        assert int(problem.answer) == sum(eval(s.split("=")[1]) for s in sums)  # noqa: S307 (digits and +)
        assert format_reward(solution).valid and canonicalize(solution).changes == []
        assert f"\\boxed{{{problem.answer}}}" in solution
        ids = tokenizer.encode(solution, add_special_tokens=False)
        (block,) = parse_structure(ids, tags, require_block=True).blocks
        assert 2 <= len(block.branches) == len(sums) <= 4
    with pytest.raises(ValueError, match="parts"):
        make_synth_dataset(5, parts=(3, 2))


def test_npr_data_synth_command(tmp_path, capsys):
    out = tmp_path / "synth.jsonl"
    assert main(["data", "synth", "--out", str(out), "--n", "7", "--parts", "3", "3", "--solutions"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 7 and all(r["solution"].count("<step>") == 3 for r in records)
    assert main(["data", "synth", "--out", str(tmp_path / "x.jsonl"), "--n", "0"]) == 2
    assert main(["data", "synth", "--out", str(tmp_path / "missing" / "x.jsonl"), "--n", "2"]) == 2
    assert not (tmp_path / "missing").exists()


def test_problem_records_round_trip_with_their_ids(tmp_path):
    """Problems written with to_json() read back unchanged: ids are not prefixed a second time
    (problem ids seed the samplers and key resumed runs). Plain ids still get the source."""
    from megatron_npr.data.problems import Problem
    problems = [p for p, _ in make_synth_dataset(5, seed=3)]
    path = tmp_path / "synth.jsonl"
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in problems))
    assert load_problems(path, source="synth") == problems and problems[0].id == "synth-0"
    path.write_text(json.dumps({"id": 7, "question": "q?", "answer": "1"}) + "\n")
    assert load_problems(path, source="aime") == [Problem("aime-7", "q?", "1", "aime")]


def test_reference_evaluation_format_loads(tmp_path):
    """The reference's evaluation files: a JSON list of {"prompt": [{"from": "user", "value": Q}],
    "final_answer": A}; a record without a user turn or an answer is named by index."""
    records = [{"prompt": [{"from": "system", "value": "be brief"}, {"from": "user", "value": " What is 2+3? "}],
                "final_answer": "5"},
               {"prompt": [{"role": "user", "content": "Find x if 2x = 8."}], "final_answer": 4},
               {"prompt": [{"from": "user", "value": "No answer here"}]},
               {"prompt": [{"from": "assistant", "value": "no user turn"}], "final_answer": "1"}]
    path = tmp_path / "aime25_eval.json"
    path.write_text(json.dumps(records))
    problems = load_problems(path, skip_bad=True)
    assert [(p.id, p.question, p.answer, p.source) for p in problems] == [
        ("aime25_eval-0", "What is 2+3?", "5", "aime25_eval"),
        ("aime25_eval-1", "Find x if 2x = 8.", "4", "aime25_eval")]
    with pytest.raises(ProblemFormatError, match=r"record 2: missing 'answer' \(or 'final_answer'\)"):
        load_problems(path)
    path.write_text(json.dumps(records[3:]))
    with pytest.raises(ProblemFormatError, match="record 0: missing 'question', 'problem' or a user turn"):
        load_problems(path)
