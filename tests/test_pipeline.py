"""`npr pipeline` end to end on a very small configuration, and every example config loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from megatron_npr.config import load_config
from megatron_npr.rl.config import RLConfig

ROOT = Path(__file__).resolve().parent.parent


OVERRIDES = ["model.hidden_size=32", "model.num_hidden_layers=1", "model.intermediate_size=64",
             "synth.bootstrap=60", "synth.sample=8", "synth.eval=8", "bootstrap.steps=6", "bootstrap.rows_per_step=2",
             "sample.max_samples=2", "sample.sampling.n=2", "sample.sampling.max_new_tokens=80", "sft.epochs=1",
             "eval.sampling.max_new_tokens=80", "eval.measure_speedup=2",
             *(f"{stage}.{key}" for stage in ("dapo", "papo")
               for key in ("steps=2", "prompts_per_step=2", "sampling.n=2", "sampling.max_new_tokens=80"))]


def seed_accepted_record(cfg, out: Path) -> str:
    """Write the pipeline's data, then one accepted record for the first sampling problem (its
    canonical solution), as a rejection run killed right after writing it leaves the output: the
    pipeline must resume inside that stage, and SFT has at least one sample whatever the tiny
    model draws. Returns the problem's id."""
    from megatron_npr.data.synth import make_synth_dataset
    from megatron_npr.pipeline.run import make_data

    paths = make_data(cfg, out)
    s = cfg.synth
    solutions = {p.question: sol for p, sol in make_synth_dataset(3 * (s.bootstrap + s.sample + s.eval),
                                                                  tuple(s.parts), s.digits, s.seed)}
    problem = json.loads(paths["sample"].read_text().splitlines()[0])
    record = {**problem, "response": solutions[problem["question"]], "sample": 0}
    (out / "rs").mkdir(parents=True)
    (out / "rs" / "accepted.jsonl").write_text(json.dumps(record) + "\n")
    return problem["id"]


def test_pipeline_runs_every_stage_and_resumes(tmp_path):
    from megatron_npr.pipeline.config import PipelineConfig
    from safetensors.torch import load_file

    out = tmp_path / "run"
    overrides = [f"out_dir={out}", *OVERRIDES]
    seeded = seed_accepted_record(load_config(PipelineConfig, ROOT / "examples/tiny/pipeline.yaml", overrides), out)
    cmd = [sys.executable, "-m", "megatron_npr.cli", "pipeline", str(ROOT / "examples/tiny/pipeline.yaml"), *overrides]
    env = os.environ | {"OMP_NUM_THREADS": "2"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    report = json.loads((out / "report" / "metrics.json").read_text())
    rs = report["stages"]["rejection_sampling"]
    assert (rs["problems"], rs["finished"], rs["resumed"]) == (8, 8, 1) and rs["accepted"] >= 1
    assert rs["drawn"] == 1 + 7 * 2 and 8 <= rs["examined"] <= 15  # seeded: its one draw; others: one round of 2
    records = [json.loads(line) for line in (out / "rs" / "accepted.jsonl").read_text().splitlines()]
    assert records[0]["id"] == seeded and len(records) == rs["accepted"]
    sft = json.loads((out / "sft" / "summary.json").read_text())
    assert sft["steps"] >= 1 and (out / "sft" / "metrics.jsonl").is_file() and report["stages"]["sft"] == sft
    # both RL stages ran their steps with the algorithm's decoding and exported a model
    for stage, parallel in (("dapo", False), ("papo", True)):
        summary = report["stages"][stage]
        assert (summary["algorithm"], summary["steps"]) == (stage, 2), summary
        assert summary["export_hf"] == str(out / f"model_{stage}")
        rl_cfg = load_config(RLConfig, out / stage / "rl.yaml")
        assert rl_cfg.sampling.parallel is parallel and rl_cfg.rl.steps == 2
    # each stage starts from the previous stage's model, and every one that trained changed it
    assert load_config(RLConfig, out / "dapo" / "rl.yaml").model.hf_dir == str(out / "model_bootstrap")
    assert load_config(RLConfig, out / "papo" / "rl.yaml").model.hf_dir == str(out / "model_sft")
    weights = {m: load_file(out / f"model_{m}" / "model.safetensors") for m in ("bootstrap", "dapo", "sft")}
    assert weights["dapo"].keys() == weights["sft"].keys()
    assert any(not weights["dapo"][k].equal(weights["sft"][k]) for k in weights["dapo"])  # SFT changed the model
    assert any(not weights["bootstrap"][k].equal(weights["dapo"][k]) for k in weights["dapo"]) or \
        report["stages"]["dapo"]["skipped_steps"] == 2  # a step without an informative group trains nothing
    for name, parallel in (("bootstrap", False), ("dapo", False), ("sft", True), ("papo", True)):
        r = report["eval"][name]  # each stage's model decoded as its stage decodes, 2 samples at T=1
        assert r["problems"] == 8 and r["accuracy"] * 16 == round(r["accuracy"] * 16)
        assert (r["sampling"]["parallel"], r["sampling"]["n"], r["sampling"]["temperature"]) == (parallel, 2, 1.0)
    assert (out / "report" / "eval.png").is_file() and (out / "report" / "curves.png").is_file()
    # the default tiny tokenizer, built into out_dir, travels in every model folder: the engine and
    # the `npr sft`/`npr rl` children load it from there (a Qwen3 vocabulary would not fit the model)
    from megatron_npr.data.tokenizer import load_vocab
    tiny = load_vocab(tokenizer_dir=out / "tokenizer").tokenizer.get_vocab()
    assert len(tiny) == 512
    for model in ("init", "bootstrap", "dapo", "sft", "papo"):
        assert load_vocab(out / f"model_{model}").tokenizer.get_vocab() == tiny, model
        assert json.loads((out / f"model_{model}" / "config.json").read_text())["vocab_size"] == 512
    assert "accuracy" in first.stdout and "PAPO" in first.stdout and "SFT skipped" not in first.stdout
    # every stage's output exists: a second run redoes nothing and reports exactly the same numbers
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((out / "report" / "metrics.json").read_text())
    assert second["eval"] == report["eval"]
    assert second["stages"]["rejection_sampling"] == rs | {"resumed": 8}  # all 8 now come from the first run
    assert {k: second["stages"][k] for k in ("dapo", "sft", "papo")} == \
        {k: report["stages"][k] for k in ("dapo", "sft", "papo")}
    for stage in ("bootstrap", "eval_bootstrap", "dapo", "eval_dapo", "sft", "eval_sft", "papo", "eval_papo"):
        assert f"[pipeline] {stage} done in 0.0 s" in again.stdout, again.stdout


def test_bootstrap_mixes_plain_causal_and_parallel_npr_samples(tmp_path):
    """`causal_npr` of the records keep the NPR solution trained causally (positions 0..n-1, full
    lower triangle, every response token trained, tags included: a sequential decode samples them
    all), `parallel_npr` keep it under its branch layout (exactly what SFT builds from the same
    text), the rest are plain chains trained causally."""
    from megatron_npr.data.synth import make_synth_dataset, plain_solution
    from megatron_npr.data.tiny_tokenizer import write_tiny_tokenizer
    from megatron_npr.data.tokenizer import load_vocab
    from megatron_npr.pipeline.bootstrap import bootstrap_samples
    from megatron_npr.training.samples import to_sample

    vocab = load_vocab(tokenizer_dir=write_tiny_tokenizer(tmp_path / "tokenizer"))
    pairs = make_synth_dataset(300, (2, 3))
    path = tmp_path / "boot.jsonl"
    path.write_text("".join(json.dumps(p.to_json() | {"solution": s}) + "\n" for p, s in pairs))
    samples = bootstrap_samples(path, vocab, causal_npr=0.2, parallel_npr=0.3, max_tokens=256, seed=0)
    assert len(samples) == 300
    kinds = {"plain": 0, "causal_npr": 0, "parallel_npr": 0}
    for (problem, solution), sample in zip(pairs, samples):
        prompt = vocab.prompt_ids(problem.question, "")
        response = sample.token_ids[len(prompt):].tolist()
        text = vocab.decode(response[:-1])
        assert response[-1] == vocab.end_of_turn_id and text in (solution, plain_solution(problem.question))
        n = len(sample.token_ids)
        causal = sample.layout.dense_mask().equal(torch.ones(n, n, dtype=torch.bool).tril())
        if causal:
            assert sample.layout.position_ids.tolist() == list(range(n))
            assert sample.loss_mask.tolist() == [False] * len(prompt) + [True] * len(response)
            kinds["plain" if text != solution else "causal_npr"] += 1
        else:
            assert text == solution  # only NPR text has a branch layout
            reference = to_sample(prompt, response, vocab)
            assert sample.layout.dense_mask().equal(reference.layout.dense_mask())
            assert sample.loss_mask.equal(reference.loss_mask) and not sample.loss_mask[len(prompt):].all()
            kinds["parallel_npr"] += 1
    assert 40 <= kinds["causal_npr"] <= 80 and 70 <= kinds["parallel_npr"] <= 110, kinds  # 60 and 90 expected
    plain_only = bootstrap_samples(path, vocab, causal_npr=0.0, parallel_npr=0.0, max_tokens=256)
    assert all("<" not in vocab.decode(s.token_ids.tolist()).split("assistant")[-1].replace("<|im_end|>", "")
               for s in plain_only)
    with pytest.raises(ValueError, match=r"boot.jsonl:1: .* tokens > bootstrap.max_tokens 20"):
        bootstrap_samples(path, vocab, causal_npr=0.2, parallel_npr=0.3, max_tokens=20)
    with pytest.raises(ValueError, match="sum <= 1"):
        bootstrap_samples(path, vocab, causal_npr=0.6, parallel_npr=0.6, max_tokens=256)


def test_bootstrap_is_bit_reproducible(tmp_path):
    """Two bootstraps from the same inputs give bitwise the same weights (deterministic kernels);
    control: another seed gives other weights, so the comparison can fail."""
    from safetensors.torch import load_file

    from megatron_npr.checkpoint.tiny import TinyQwen3, write_random_qwen3
    from megatron_npr.data.synth import make_synth_dataset
    from megatron_npr.data.tiny_tokenizer import write_tiny_tokenizer
    from megatron_npr.data.tokenizer import load_vocab
    from megatron_npr.pipeline.bootstrap import bootstrap_samples, bootstrap_tiny

    vocab = load_vocab(tokenizer_dir=write_tiny_tokenizer(tmp_path / "tokenizer"))
    write_random_qwen3(tmp_path / "init", vocab.tokenizer, TinyQwen3(hidden_size=32, num_hidden_layers=2,
                                                                      intermediate_size=64))
    path = tmp_path / "boot.jsonl"
    path.write_text("".join(json.dumps(p.to_json() | {"solution": s}) + "\n" for p, s in make_synth_dataset(64)))
    samples = bootstrap_samples(path, vocab, causal_npr=0.2, parallel_npr=0.3, max_tokens=256)
    weights = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        bootstrap_tiny(tmp_path / "init", samples, tmp_path / name, steps=12, lr=5e-3, rows_per_step=4,
                       max_tokens=256, seed=seed, progress=False)
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])
    assert any(not weights[0][k].equal(weights[2][k]) for k in weights[0])
    assert not torch.are_deterministic_algorithms_enabled()  # the setting is restored afterwards


def test_plain_solution_matches_the_canonical_answer():
    from megatron_npr.data.synth import make_synth_dataset, plain_solution
    from megatron_npr.topology import last_boxed

    for problem, solution in make_synth_dataset(50, (1, 4), 2, seed=3):
        plain = plain_solution(problem.question)
        assert last_boxed(plain) == problem.answer == last_boxed(solution)
        terms = problem.question.count(" = ")
        assert plain.count(".") == terms + (terms > 1) + 1  # one sentence per part, the total, the answer line
        chain, _ = plain.split("\n")
        for sentence in chain.rstrip(".").split(". "):  # "A = 3 + 4 = 7", "A + B = 7 + 7 = 14": each adds up
            _, addends, value = sentence.split(" = ")
            assert sum(int(t) for t in addends.split(" + ")) == int(value), plain
    with pytest.raises(ValueError, match="not a synthetic question"):
        plain_solution("What is 2 + 2?")


def test_tokenizer_choice_travels_with_the_model_folder(tmp_path, vocab):
    """tiny: built once into out_dir/tokenizer; qwen3: the bundled one; else a folder. A model
    folder of an earlier run with another tokenizer is refused, not silently reused."""
    from dataclasses import replace

    from megatron_npr.checkpoint.tiny import TinyQwen3
    from megatron_npr.data.tokenizer import load_vocab
    from megatron_npr.pipeline.config import PipelineConfig
    from megatron_npr.pipeline.run import make_model, tokenizer_folder

    cfg = PipelineConfig(out_dir=str(tmp_path), model=TinyQwen3(hidden_size=16, num_hidden_layers=1,
                                                                intermediate_size=16))
    folder = tokenizer_folder(cfg, tmp_path)
    assert folder == str(tmp_path / "tokenizer") and tokenizer_folder(cfg, tmp_path) == folder
    assert tokenizer_folder(replace(cfg, tokenizer="qwen3"), tmp_path) is None
    assert tokenizer_folder(replace(cfg, tokenizer=str(tmp_path / "mine")), tmp_path) == str(tmp_path / "mine")
    tiny = load_vocab(tokenizer_dir=folder)
    make_model(cfg, tiny, tmp_path / "model")
    make_model(cfg, tiny, tmp_path / "model")  # a resumed run keeps it
    assert load_vocab(tmp_path / "model").tags == tiny.tags and len(load_vocab(tmp_path / "model")) == 512
    with pytest.raises(ValueError, match="another tokenizer"):
        make_model(replace(cfg, tokenizer="qwen3"), vocab, tmp_path / "model")


def _config_class(path: Path):
    from megatron_npr.eval.runner import EvalConfig
    from megatron_npr.pipeline.config import PipelineConfig
    from megatron_npr.rl.config import RLConfig
    from megatron_npr.training.rejection import RejectionConfig
    from megatron_npr.training.sft_config import SFTConfig
    name = path.stem
    if name.startswith(("dapo", "papo")):
        return RLConfig
    return {"pipeline": PipelineConfig, "eval": EvalConfig}.get(name) or (
        RejectionConfig if name.startswith("sample") else SFTConfig)


@pytest.mark.parametrize("path", sorted(ROOT.glob("examples/**/*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    assert load_config(_config_class(path), path) is not None


def test_builtin_default_is_the_tiny_example():
    from megatron_npr.pipeline.config import PipelineConfig
    assert load_config(PipelineConfig, ROOT / "examples/tiny/pipeline.yaml") == PipelineConfig()


def test_bad_override_names_the_key(capsys):
    from megatron_npr.cli import main
    assert main(["pipeline", "synth.partz=[1,2]"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'synth.partz'" in err and "did you mean 'synth.parts'" in err, err
