"""Evaluation: metrics against hand-computed values, the runner on a real engine, run_eval."""
import json

import pytest
from rollout_fakes import ReplayEngine, response_ids, tiny_engine, tiny_qwen, write_problems

from megatron_npr.config import load_config
from megatron_npr.data.prompts import prompt_ids
from megatron_npr.data.synth import make_synth_dataset
from megatron_npr.eval import EvalConfig, SampleRecord, evaluate, run_eval, summarize
from megatron_npr.data.tokenizer import NPRVocab
from megatron_npr.rewards import ExactIntGrader
from megatron_npr.rollout import SamplingParams
from megatron_npr.topology import build_layout

PAIRS = make_synth_dataset(3, parts=(2, 4), seed=5)
PROBLEMS = [p for p, _ in PAIRS]


def critical_path(tokenizer, tags, problem, solution):
    """Decode steps of a parallel engine, from build_layout's positions (independent of the metrics)."""
    prompt = prompt_ids(problem.question, tokenizer)
    layout = build_layout(prompt + response_ids(tokenizer, solution), tags, len(prompt))
    return int(layout.position_ids[len(prompt):].max()) + 1 - len(prompt)


def test_summary_matches_hand_computed_values():
    records = [SampleRecord(0, True, "stop", True, None, 10, 6, (2,)),
               SampleRecord(0, False, "length", False, "length", 20, None, ()),
               SampleRecord(1, False, "stop", True, None, 8, 8, ()),
               SampleRecord(1, False, "invalid_structure", False, "unclosed_block", 12, None, (3,))]
    result = summarize(records, problems=2, samples_per_problem=2)
    assert (result.accuracy, result.best_at_n, result.format_validity, result.parallel_trigger_rate) == \
        (0.25, 0.5, 0.5, 0.5)
    # only record 0 is valid *and* has a block (record 2 is a valid plain answer, record 3 an invalid block)
    assert result.npr_format_rate == 0.25
    assert result.mean_branches_per_block == 2.5 and result.mean_response_tokens == 12.5
    assert result.ideal_speedup == pytest.approx(18 / 14)
    assert result.finish_reasons == {"stop": 2, "length": 1, "invalid_structure": 1}
    assert result.invalid_reasons == {"length": 1, "unclosed_block": 1}
    assert result.measured_speedup is None and "n/a" in result.table()
    assert summarize(records[1:2], 1, 1).ideal_speedup == 1.0  # nothing valid


def test_canonical_solutions_replayed_in_parallel_score_perfectly(qwen):
    tokenizer, tags = qwen
    engine = ReplayEngine(tiny_engine(tokenizer, tags), tokenizer, {p.question: s for p, s in PAIRS})
    params = SamplingParams(n=2, max_new_tokens=400, parallel=True)
    with ExactIntGrader() as grader:
        result = evaluate(engine, NPRVocab(tokenizer, tags), PROBLEMS, params, grader, measure_speedup=2,
                          progress=False, batch_problems=2)

    lengths = [len(response_ids(tokenizer, s)) for _, s in PAIRS]
    critical = [critical_path(tokenizer, tags, p, s) for p, s in PAIRS]
    branches = [s.count("<step>") for _, s in PAIRS]
    assert (result.problems, result.samples_per_problem) == (3, 2)
    assert (result.accuracy, result.best_at_n, result.format_validity, result.parallel_trigger_rate) == (1, 1, 1, 1)
    assert result.ideal_speedup == pytest.approx(sum(lengths) / sum(critical)) and result.ideal_speedup > 1.3
    assert result.mean_branches_per_block == pytest.approx(sum(branches) / 3)
    assert result.mean_response_tokens == pytest.approx(sum(lengths) / 3)
    assert result.finish_reasons == {"stop": 6} and result.invalid_reasons == {}
    assert result.measured_samples == 2 and result.sequential_time_s > 0 and result.parallel_time_s > 0
    assert result.measured_speedup == pytest.approx(result.sequential_time_s / result.parallel_time_s)
    assert json.loads(json.dumps(result.to_json()))["ideal_speedup"] == result.ideal_speedup
    assert "avg@2" in result.table() and "measured speedup" in result.table()


def test_corrupted_and_wrong_responses_lower_validity_and_accuracy(qwen):
    tokenizer, tags = qwen
    (p0, s0), (p1, s1), (p2, s2) = PAIRS
    gap = s1.replace("</step><step>", "</step>\n<step>", 1)  # text between branches, answer still right
    wrong = s2.replace(f"\\boxed{{{p2.answer}}}", f"\\boxed{{{int(p2.answer) + 1}}}")  # valid, wrong answer
    engine = ReplayEngine(tiny_engine(tokenizer, tags), tokenizer, {p0.question: s0, p1.question: gap,
                                                                    p2.question: wrong})
    params = SamplingParams(n=1, max_new_tokens=400, parallel=False)  # sequential decoding replays any text
    with ExactIntGrader() as grader:
        result = evaluate(engine, NPRVocab(tokenizer, tags), PROBLEMS, params, grader, measure_speedup=0,
                          progress=False)
    assert result.accuracy == pytest.approx(2 / 3) and result.best_at_n == pytest.approx(2 / 3)
    assert result.format_validity == pytest.approx(2 / 3) and result.parallel_trigger_rate == pytest.approx(2 / 3)
    assert result.invalid_reasons == {"text_between_branches": 1} and result.finish_reasons == {"stop": 3}
    valid = [(p0, s0), (p2, wrong)]
    expected = sum(len(response_ids(tokenizer, s)) for _, s in valid) / \
        sum(critical_path(tokenizer, tags, p, s) for p, s in valid)
    assert result.ideal_speedup == pytest.approx(expected)
    assert result.measured_speedup is None and result.measured_samples == 0


def test_run_eval_from_a_config_writes_json(tmp_path, qwen):
    tokenizer, tags = qwen
    tiny_qwen().save_pretrained(tmp_path / "model")
    data = tmp_path / "synth.jsonl"
    write_problems(data, PROBLEMS[:2])
    with data.open("a") as f:
        f.write(json.dumps({"problem": "no answer"}) + "\n")
    out = tmp_path / "eval" / "result.json"
    cfg = load_config(EvalConfig, None, [f"engine.hf_dir={tmp_path / 'model'}", f"data.path={data}",
                                         "data.skip_bad=true", "sampling.max_new_tokens=3", "sampling.n=2",
                                         "sampling.temperature=0", f"out={out}"])
    result = run_eval(cfg, vocab=NPRVocab(tokenizer, tags), progress=False)
    assert result.problems == 2 and result.accuracy == 0 and result.finish_reasons == {"length": 4}
    written = json.loads(out.read_text())
    assert written["result"] == result.to_json() and written["data"]["skipped_records"] == 1
    assert "record 2" in written["data"]["skipped_first"] and written["config"]["sampling"]["n"] == 2


def test_measured_speedup_skips_responses_the_parallel_engine_cannot_replay(qwen):
    """A sequentially sampled response that parses as valid but labels its branches otherwise
    than the engine forces them (`<step> 1:` instead of `<step>1:`) cannot be replayed in
    parallel: it is left out of the measured speedup instead of failing the evaluation, and the
    engine is usable again after the failed replay (no KV slot leaked)."""
    tokenizer, tags = qwen
    (p0, s0), (p1, s1), (p2, s2) = PAIRS
    spaced = s1.replace("<step>1:", "<step> 1:")
    assert spaced != s1
    inner = tiny_engine(tokenizer, tags)
    engine = ReplayEngine(inner, tokenizer, {p0.question: s0, p1.question: spaced, p2.question: s2})
    params = SamplingParams(n=1, max_new_tokens=400, parallel=False)
    with ExactIntGrader() as grader:
        result = evaluate(engine, NPRVocab(tokenizer, tags), PROBLEMS, params, grader, measure_speedup=3,
                          progress=False)
    assert result.format_validity == 1 and result.npr_format_rate == 1
    assert result.measured_samples == 2 and result.measured_speedup is not None
    assert inner.pool.free == inner.pool.num_slots and inner.pool.reserved == 0
