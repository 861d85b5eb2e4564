"""Stage-2 rejection sampling: acceptance, reasons, resuming, bad records, the real engine."""
import json

import pytest
from rollout_fakes import ReplayEngine, ScriptedEngine, response_ids, tiny_engine, write_problems

from megatron_npr.config import ConfigError, load_config
from megatron_npr.data.problems import ProblemFormatError
from megatron_npr.data.prompts import prompt_ids
from megatron_npr.data.synth import make_synth_dataset
from megatron_npr.data.tokenizer import NPRVocab
from megatron_npr.rollout import SamplingParams
from megatron_npr.seeding import problem_seed
from megatron_npr.training.rejection import RejectionConfig, load_finished, run_rejection_sampling

PAIRS = make_synth_dataset(5, parts=(2, 3), seed=11)


def wrong(problem, solution):
    return solution.replace(f"\\boxed{{{problem.answer}}}", f"\\boxed{{{int(problem.answer) + 1}}}")


def variants(problem, solution):
    """Responses of every kind, with the reason rejection sampling must give each."""
    return {
        "good": ((solution, "stop"), "accepted"),
        "wrong": ((wrong(problem, solution), "stop"), "wrong_answer"),
        "gap": ((solution.replace("</step><step>", "</step>\n<step>", 1), "stop"), "text_between_branches"),
        "no_block": ((f"The answer is \\boxed{{{problem.answer}}}.", "stop"), "missing_block"),
        "cut": ((solution[:40], "length"), "length"),
        "engine_invalid": ((solution[:solution.index("</step>") + 7], "invalid_structure"), "unclosed_block"),
    }


def config(tmp_path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "synth.jsonl"
    if not data.exists():
        write_problems(data, [p for p, _ in PAIRS])
    cfg = {"engine": {"hf_dir": "unused"}, "data": {"path": str(data)}, "out": str(tmp_path / "out" / "accepted.jsonl"),
           "max_samples": 4, "sampling": {"n": 2, "max_new_tokens": 400}, "batch_problems": 2}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            cfg[section][name] = value
        else:
            cfg[key] = value
    return load_config(RejectionConfig, None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()])


def scripts(kinds_per_problem):
    out = {}
    for (problem, solution), kinds in zip(PAIRS, kinds_per_problem):
        table = variants(problem, solution)
        out[problem.question] = [table[k][0] for k in kinds]
    return out


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_first_correct_valid_sample_is_kept_and_every_reason_counted(tmp_path, qwen):
    tokenizer, tags = qwen
    kinds = [["wrong", "gap", "good", "good"], ["no_block", "cut", "engine_invalid", "wrong"], ["good", "wrong"],
             ["gap", "good"], ["cut", "cut", "cut", "good"]]
    cfg = config(tmp_path)
    engine = ScriptedEngine(tokenizer, tags, scripts(kinds))
    stats = run_rejection_sampling(cfg, engine, NPRVocab(tokenizer, tags), progress=False)

    records = lines(tmp_path / "out" / "accepted.jsonl")
    assert [(r["id"], r["sample"]) for r in records] == [("synth-0", 2), ("synth-2", 0), ("synth-3", 1), ("synth-4", 3)]
    for record in records:
        problem, solution = PAIRS[int(record["id"].split("-")[1])]
        assert record["prompt_ids"] == prompt_ids(problem.question, tokenizer)
        assert record["response_ids"] == response_ids(tokenizer, solution)  # the engine's ids, not re-tokenized
        assert record["forced"] == [int(t == tags["<step>"]) for t in record["response_ids"]]
        assert record["response"] == tokenizer.decode(record["response_ids"]) and record["parallel"] is False
        assert (record["question"], record["answer"], record["source"]) == (problem.question, problem.answer, "synth")
    # examined: draws up to the accepted one; drawn: whole rounds of 2
    assert stats.reasons == {"accepted": 4, "wrong_answer": 2, "text_between_branches": 2, "missing_block": 1,
                             "length": 4, "unclosed_block": 1}
    assert (stats.examined, stats.drawn, stats.finished, stats.accepted) == (14, 16, 5, 4)
    assert stats.problem_acceptance == 0.8 and stats.accepted_at == {"0": 1, "1": 1, "2": 1, "3": 1}
    done = lines(tmp_path / "out" / "accepted.jsonl.done.jsonl")
    assert done[1] == {"id": "synth-1", "outcome": "rejected", "sample": None, "examined": 4, "drawn": 4,
                       "counts": {"length": 1, "missing_block": 1, "unclosed_block": 1, "wrong_answer": 1}}
    assert json.loads((tmp_path / "out" / "accepted.jsonl.stats.json").read_text()) == stats.to_json()
    table = stats.table()
    assert "text_between_branches" in table and "4 (80.0%)" in table
    # one seed per problem and round, from the problem's id
    assert engine.seeds[PAIRS[0][0].question] == [problem_seed(0, "synth-0", r) for r in (0, 1)]


def test_results_do_not_depend_on_batching(tmp_path, qwen):
    tokenizer, tags = qwen
    kinds = [["wrong", "good"], ["good", "good"], ["cut", "cut", "gap", "good"], ["wrong"] * 4, ["gap", "good"]]
    outputs, seeds = [], []
    for batch in (1, 3):
        cfg = config(tmp_path / f"b{batch}", batch_problems=batch)
        engine = ScriptedEngine(tokenizer, tags, scripts(kinds))
        run_rejection_sampling(cfg, engine, NPRVocab(tokenizer, tags), progress=False)
        outputs.append((tmp_path / f"b{batch}" / "out" / "accepted.jsonl").read_bytes())
        seeds.append(dict(engine.seeds))
    assert outputs[0] == outputs[1] and seeds[0] == seeds[1]


def test_resume_after_a_crash_writes_the_same_file_without_duplicates(tmp_path, qwen):
    tokenizer, tags = qwen
    kinds = [["wrong", "gap", "good", "good"], ["cut", "good"], ["wrong"] * 4, ["good", "good"], ["gap", "good"]]
    whole = config(tmp_path / "a")
    run_rejection_sampling(whole, ScriptedEngine(tokenizer, tags, scripts(kinds)), NPRVocab(tokenizer, tags),
                           progress=False)

    resumed = config(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):  # 3rd call: inside the second batch
        run_rejection_sampling(resumed, ScriptedEngine(tokenizer, tags, scripts(kinds), crash_on_call=3),
                               NPRVocab(tokenizer, tags), progress=False)
    out_b = tmp_path / "b" / "out" / "accepted.jsonl"
    assert [r["id"] for r in lines(out_b)] == ["synth-0", "synth-1"]  # the first batch only
    engine = ScriptedEngine(tokenizer, tags, scripts(kinds))
    stats = run_rejection_sampling(resumed, engine, NPRVocab(tokenizer, tags), progress=False)
    assert PAIRS[0][0].question not in engine.seeds and stats.resumed == 2  # finished problems are skipped
    out_a = tmp_path / "a" / "out" / "accepted.jsonl"
    assert out_b.read_bytes() == out_a.read_bytes()
    stats_a = json.loads((tmp_path / "a" / "out" / "accepted.jsonl.stats.json").read_text())
    assert {k: v for k, v in stats.to_json().items() if k != "resumed"} == \
        {k: v for k, v in stats_a.items() if k != "resumed"}

    # died between the two writes (record written, sidecar not), and a half-written line: the record wins
    done_b = tmp_path / "b" / "out" / "accepted.jsonl.done.jsonl"
    done_lines = done_b.read_text().splitlines(keepends=True)
    done_b.write_text("".join(done_lines[:-2]))  # the lines of synth-3 (accepted at draw 0) and synth-4 (1)
    with out_b.open("a") as f:
        f.write('{"id": "synth-9", "trunc')
    stats = run_rejection_sampling(resumed, ScriptedEngine(tokenizer, tags, scripts(kinds)), NPRVocab(tokenizer, tags),
                                   progress=False)
    assert out_b.read_bytes() == out_a.read_bytes()
    finished, missing = load_finished(out_b)
    assert sorted(finished) == [f"synth-{i}" for i in range(5)] and missing == []
    recovered = [line for line in lines(done_b) if line.get("recovered")]
    assert [(r["id"], r["counts"]) for r in recovered] == [("synth-3", {"accepted": 1}),
                                                           ("synth-4", {"accepted": 1, "unrecorded": 1})]
    assert stats.finished == 5 and stats.accepted == 4


def test_bad_problem_records_are_counted_or_named(tmp_path, qwen):
    tokenizer, tags = qwen
    data = tmp_path / "synth.jsonl"
    problem, solution = PAIRS[0]
    data.write_text(json.dumps({"question": problem.question, "answer": problem.answer}) + "\n"
                    + json.dumps({"question": "no answer here"}) + "\n")
    with pytest.raises(ProblemFormatError, match=r"synth.jsonl: record 1: missing 'answer'"):
        run_rejection_sampling(config(tmp_path), None, NPRVocab(tokenizer, tags), progress=False)
    engine = ScriptedEngine(tokenizer, tags, {problem.question: [(solution, "stop")] * 2})
    stats = run_rejection_sampling(config(tmp_path, **{"data.skip_bad": True}), engine, NPRVocab(tokenizer, tags),
                                   progress=False)
    assert stats.skipped_records == 1 and stats.accepted == 1 and stats.problems == 1
    assert str(data) in stats.skipped_report and "record 1: missing 'answer'" in stats.skipped_report
    assert "bad records skipped" in stats.table()


@pytest.mark.parametrize("override,message", [
    ("sampling.n=9", "sampling.n (draws per round) must be <= max_samples=4, got 9"),
    ("sampling.top_p=0", "sampling: SamplingParams: invalid top_p=0"),
    ("batch_problems=0", "batch_problems must be >= 1"),
    ("grader.kind=sympy", "'grader.kind' must be one of ['auto', 'math', 'exact_int']"),
    ("data.limit=0", "data: limit must be >= 1"),
])
def test_config_errors_name_the_field(tmp_path, override, message):
    path = tmp_path / "rs.yaml"
    path.write_text("engine: {hf_dir: m}\ndata: {path: d.jsonl}\nout: o.jsonl\nmax_samples: 4\nsampling: {top_k: 5}\n")
    loaded = load_config(RejectionConfig, path)  # the stage's defaults for its sampling section stay
    assert (loaded.sampling.parallel, loaded.sampling.n, loaded.sampling.top_k) == (False, 4, 5)
    with pytest.raises(ConfigError) as err:
        load_config(RejectionConfig, path, [override])
    assert message in str(err.value)


def test_engine_seeds_make_samples_independent_of_batching(qwen):
    tokenizer, tags = qwen
    engine = tiny_engine(tokenizer, tags)
    prompts = [prompt_ids(p.question, tokenizer) for p, _ in PAIRS[:2]]
    params = SamplingParams(n=2, max_new_tokens=4, seed=5)
    together = engine.generate(prompts, params, seeds=[11, 12])
    alone = engine.generate(prompts[1:], params, seeds=[12])
    other = engine.generate(prompts[1:], params, seeds=[13])
    assert [r.token_ids for r in together[2:]] == [r.token_ids for r in alone]
    assert [r.token_ids for r in alone] != [r.token_ids for r in other]
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prompts"):
        engine.generate(prompts, params, seeds=[1])


@pytest.mark.parametrize("parallel", [False, True])
def test_real_engine_end_to_end(tmp_path, qwen, parallel):
    tokenizer, tags = qwen
    engine = tiny_engine(tokenizer, tags)
    cfg = config(tmp_path, **{"sampling.parallel": parallel, "data.limit": 2})
    replay = ReplayEngine(engine, tokenizer, {p.question: s for p, s in PAIRS[:2]})
    stats = run_rejection_sampling(cfg, replay, NPRVocab(tokenizer, tags), progress=False)
    assert stats.reasons == {"accepted": 2} and stats.drawn == 4
    for record, (problem, solution) in zip(lines(tmp_path / "out" / "accepted.jsonl"), PAIRS):
        assert record["response_ids"] == response_ids(tokenizer, solution) and record["parallel"] is parallel
        forced = [t for t, f in zip(record["response_ids"], record["forced"]) if f]
        # sequential decoding inserts nothing; the parallel engine forces <step> + label and <takeaway>
        assert (tags["<takeaway>"] in forced and tags["<step>"] in forced) if parallel else forced == []

    sampled = config(tmp_path / "sampled", **{"sampling.max_new_tokens": 3, "data.limit": 1})
    # a random model: all cut off
    stats = run_rejection_sampling(sampled, engine, NPRVocab(tokenizer, tags), progress=False)
    assert stats.reasons == {"length": 4} and stats.accepted == 0
