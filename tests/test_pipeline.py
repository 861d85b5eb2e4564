"""`npr pipeline` end to end on a very small configuration, and every example config loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_npr.config import load_config

ROOT = Path(__file__).resolve().parent.parent


OVERRIDES = ["model.hidden_size=32", "model.num_hidden_layers=1", "model.intermediate_size=64",
             "synth.bootstrap=60", "synth.sample=8", "synth.eval=8", "bootstrap.steps=6", "bootstrap.rows_per_step=2",
             "sample.max_samples=2", "sample.sampling.n=2", "sample.sampling.max_new_tokens=80", "sft.epochs=1",
             "eval.sampling.max_new_tokens=80", "eval.measure_speedup=2"]


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
    rs = report["rejection_sampling"]
    assert (rs["problems"], rs["finished"], rs["resumed"]) == (8, 8, 1) and rs["accepted"] >= 1
    assert rs["drawn"] == 1 + 7 * 2 and 8 <= rs["examined"] <= 15  # seeded: its one draw; others: one round of 2
    records = [json.loads(line) for line in (out / "rs" / "accepted.jsonl").read_text().splitlines()]
    assert records[0]["id"] == seeded and len(records) == rs["accepted"] and "sft_skipped" not in rs
    sft = json.loads((out / "sft" / "summary.json").read_text())
    assert sft["steps"] >= 1 and (out / "sft" / "metrics.jsonl").is_file()
    boot, tuned = load_file(out / "model_bootstrap" / "model.safetensors"), load_file(out / "model_sft" /
                                                                                      "model.safetensors")
    assert boot.keys() == tuned.keys() and any(not boot[k].equal(tuned[k]) for k in boot)  # SFT changed the model
    for when in ("before", "after"):
        r = report[when]
        assert r["problems"] == 8 and r["accuracy"] * 8 == round(r["accuracy"] * 8)
    assert (out / "report" / "eval.png").is_file() and (out / "report" / "loss.png").is_file()
    # the default tiny tokenizer, built into out_dir, travels in every model folder: the engine and
    # the `npr sft` child load it from there (a Qwen3 vocabulary would not fit the 512-row model)
    from megatron_npr.data.tokenizer import load_vocab
    tiny = load_vocab(tokenizer_dir=out / "tokenizer").tokenizer.get_vocab()
    assert len(tiny) == 512
    for model in ("model_init", "model_bootstrap", "model_sft"):
        assert load_vocab(out / model).tokenizer.get_vocab() == tiny, model
        assert json.loads((out / model / "config.json").read_text())["vocab_size"] == 512
    assert "accuracy" in first.stdout and "before" in first.stdout and "SFT skipped" not in first.stdout
    # every stage's output exists: a second run redoes nothing and reports exactly the same numbers
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((out / "report" / "metrics.json").read_text())
    assert (second["before"], second["after"]) == (report["before"], report["after"])
    assert second["rejection_sampling"] == rs | {"resumed": 8}  # all 8 problems now come from the first run
    for stage in ("bootstrap", "eval_before", "sft", "eval_after"):
        assert f"[pipeline] {stage} done in 0.0 s" in again.stdout, again.stdout


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
