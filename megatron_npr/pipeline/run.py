"""`npr pipeline`: the three stages end to end on a tiny model, every stage visible here.

    tokenizer -> random model -> synth data -> bootstrap (mostly plain solutions; see pipeline.bootstrap)
    -> stage 1: DAPO (sequential decoding, format + correctness reward)
    -> stage 2: rejection sampling (sequential) -> packed parallel SFT (branch mask)
    -> stage 3: PAPO (parallel decoding, correctness reward, on-policy)
    with an evaluation of every stage's model on held-out problems, and a report.

The tokenizer is chosen once (`tokenizer: tiny | qwen3 | folder`) and saved into the first model
folder; every later model folder carries it, and every stage (engine, `npr sft`, `npr rl`) loads
the tokenizer of the model folder it is given.

Each stage writes its output under out_dir atomically and is skipped when that output exists,
so a killed pipeline resumes at the stage it was in (SFT, RL and rejection sampling also resume
inside the stage).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..data.synth import make_synth_dataset
from ..io import write_json_atomic, write_jsonl_atomic
from ..sections import DataSection, EngineSection, GraderSection
from .config import PipelineConfig


def tokenizer_folder(cfg: PipelineConfig, out: Path) -> str | None:
    """The folder of the pipeline's tokenizer: for `tiny`, out_dir/tokenizer (built on the first
    run); None for `qwen3` (load_tokenizer's bundled default); else the configured folder."""
    if cfg.tokenizer == "qwen3":
        return None
    if cfg.tokenizer == "tiny":
        from ..data.tiny_tokenizer import write_tiny_tokenizer

        folder = out / "tokenizer"
        if not folder.is_dir():
            write_tiny_tokenizer(folder)
        return str(folder)
    return cfg.tokenizer


def make_model(cfg: PipelineConfig, vocab, init_dir: Path) -> None:
    """The random tiny Qwen3, with the tokenizer saved into its folder. A folder left by an
    earlier run must have been made with the same tokenizer."""
    from ..checkpoint.tiny import write_random_qwen3
    from ..data.tokenizer import load_vocab

    if not init_dir.is_dir():
        write_random_qwen3(init_dir, vocab.tokenizer, cfg.model)
    elif load_vocab(init_dir).tokenizer.get_vocab() != vocab.tokenizer.get_vocab():
        raise ValueError(f"{init_dir} was made with another tokenizer than tokenizer={cfg.tokenizer!r}; "
                         "use a new out_dir")


def make_data(cfg: PipelineConfig, out: Path) -> dict[str, Path]:
    """Three synthetic sets with disjoint questions: bootstrap (with solutions), sample, eval."""
    s = cfg.synth
    paths = {name: out / "data" / f"{name}.jsonl" for name in ("bootstrap", "sample", "eval")}
    if all(p.is_file() for p in paths.values()):
        return paths
    pool = make_synth_dataset(3 * (s.bootstrap + s.sample + s.eval), tuple(s.parts), s.digits, s.seed)
    unique, seen = [], set()
    for problem, solution in pool:
        if problem.question not in seen:
            seen.add(problem.question)
            unique.append((problem, solution))
    need = s.bootstrap + s.sample + s.eval
    if len(unique) < need:
        raise ValueError(f"synth: only {len(unique)} distinct questions for {need} problems; raise parts or digits")
    ev, sm, bs = unique[:s.eval], unique[s.eval:s.eval + s.sample], unique[s.eval + s.sample:need]
    write_jsonl_atomic(paths["bootstrap"], [p.to_json() | {"solution": sol} for p, sol in bs])
    write_jsonl_atomic(paths["sample"], [p.to_json() for p, _ in sm])
    write_jsonl_atomic(paths["eval"], [p.to_json() for p, _ in ev])
    return paths


def _engine(hf_dir: Path) -> EngineSection:
    return EngineSection(hf_dir=str(hf_dir), kv_slots=1 << 17)


def _synth_data(path: Path) -> DataSection:
    return DataSection(path=str(path), source="synth", instruction="none")  # the tiny model never saw it


def evaluate_model(cfg: PipelineConfig, hf_dir: Path, eval_path: Path, out_json: Path, parallel: bool) -> dict:
    """`npr eval` on the held-out set with the stage's decoding (exact-integer grading)."""
    from ..eval.runner import EvalConfig, run_eval

    if out_json.is_file():
        return json.loads(out_json.read_text())
    e = cfg.eval
    sampling = dataclasses.replace(e.sampling, parallel=parallel)
    result = run_eval(EvalConfig(engine=_engine(hf_dir), data=_synth_data(eval_path), sampling=sampling,
                                 grader=GraderSection(kind="exact_int"), batch_problems=e.batch_problems,
                                 measure_speedup=e.measure_speedup)).to_json()
    result["sampling"] = dataclasses.asdict(sampling)  # how this model was decoded
    write_json_atomic(out_json, result, sort_keys=False)
    return result


def rejection_sample(cfg: PipelineConfig, hf_dir: Path, problems: Path, out: Path) -> dict:
    from ..training.rejection import RejectionConfig, run_rejection_sampling

    s = cfg.sample
    rs = RejectionConfig(engine=_engine(hf_dir), data=_synth_data(problems), out=str(out), sampling=s.sampling,
                         max_samples=s.max_samples, batch_problems=s.batch_problems)
    return run_rejection_sampling(rs).to_json()


def _run_child(command: str, config, out: Path) -> dict:
    """`npr COMMAND out/COMMAND.yaml` in a child process: the same command a user runs, and
    Megatron's process state (CPU shim, process group, checkpoint workers) stays out of the
    engine's process. Returns the run's summary.json."""
    import subprocess
    import sys

    import yaml

    from ..config import config_to_dict
    from ..io import atomic_write_text

    path = atomic_write_text(out / f"{command}.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    subprocess.run([sys.executable, "-m", "megatron_npr.cli", command, str(path)], check=True)
    return json.loads((out / "summary.json").read_text())


def sft(cfg: PipelineConfig, hf_dir: Path, data: Path, out: Path, export: Path) -> dict:
    from ..sections import ModelSection
    from ..training.sft_config import SFTConfig, SFTDataSection, TrainSection

    s = cfg.sft
    return _run_child("sft", SFTConfig(
        model=ModelSection(hf_dir=str(hf_dir)),
        data=SFTDataSection(path=str(data), max_tokens=s.max_tokens, instruction="none"),
        train=TrainSection(out_dir=str(out), epochs=s.epochs, global_batch_rows=s.global_batch_rows,
                           export_hf=str(export)),
        optim=s.optim), out)


def reinforce(cfg: PipelineConfig, algorithm: str, hf_dir: Path, problems: Path, out: Path, export: Path) -> dict:
    """Stage 1 (`dapo`) or 3 (`papo`): `npr rl` from `hf_dir` on `problems`, exported to `export`."""
    from ..rl.config import RLConfig, RLEngineSection, RLSection
    from ..sections import ModelSection

    s = getattr(cfg, algorithm)
    rl = RLSection(out_dir=str(out), algorithm=algorithm, steps=s.steps, prompts_per_step=s.prompts_per_step,
                   max_generation_rounds=s.max_generation_rounds, overlong_buffer=s.overlong_buffer,
                   max_tokens=s.max_tokens, seed=s.seed, save_every=max(1, s.steps // 3), dump_rollouts=True,
                   export_hf=str(export))
    return _run_child("rl", RLConfig(model=ModelSection(hf_dir=str(hf_dir)), data=_synth_data(problems), rl=rl,
                                     optim=s.optim, sampling=s.sampling,
                                     engine=RLEngineSection(kv_slots=1 << 17)), out)


def run_pipeline(cfg: PipelineConfig) -> dict:
    from ..data.tokenizer import load_vocab
    from .bootstrap import bootstrap_samples, bootstrap_tiny
    from .report import write_report

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.perf_counter()

    def mark(stage):
        nonlocal t0
        timings[stage] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        print(f"[pipeline] {stage} done in {timings[stage]} s", flush=True)

    vocab = load_vocab(tokenizer_dir=tokenizer_folder(cfg, out))
    mark("tokenizer")
    model = {name: out / f"model_{name}" for name in ("init", "bootstrap", "dapo", "sft", "papo")}
    make_model(cfg, vocab, model["init"])
    mark("model")
    data = make_data(cfg, out)
    mark("data")
    evals, stages = {}, {}
    if not model["bootstrap"].is_dir():
        b = cfg.bootstrap
        samples = bootstrap_samples(data["bootstrap"], vocab, causal_npr=b.causal_npr, parallel_npr=b.parallel_npr,
                                    max_tokens=b.max_tokens, seed=cfg.synth.seed)
        boot = bootstrap_tiny(model["init"], samples, model["bootstrap"], steps=b.steps, lr=b.lr,
                              rows_per_step=b.rows_per_step, max_tokens=b.max_tokens, seed=cfg.synth.seed)
        write_json_atomic(out / "bootstrap.json", boot, indent=None, sort_keys=False)
    mark("bootstrap")
    evals["bootstrap"] = evaluate_model(cfg, model["bootstrap"], data["eval"], out / "eval_bootstrap.json", False)
    mark("eval_bootstrap")
    # stage 1: format-follow RL with sequential decoding
    stages["dapo"] = _stage(cfg.dapo.steps, model["bootstrap"], model["dapo"],
                            lambda: reinforce(cfg, "dapo", model["bootstrap"], data["sample"], out / "dapo",
                                              model["dapo"]))
    mark("dapo")
    evals["dapo"] = evaluate_model(cfg, model["dapo"], data["eval"], out / "eval_dapo.json", False)
    mark("eval_dapo")
    # stage 2: rejection sampling from the stage-1 model, then SFT under the branch mask
    stages["rejection_sampling"] = rejection_sample(cfg, model["dapo"], data["sample"], out / "rs" / "accepted.jsonl")
    mark("sample")
    accepted = stages["rejection_sampling"]["accepted"]
    if accepted == 0:
        print("[pipeline] rejection sampling accepted no sample: SFT skipped", flush=True)
    stages["sft"] = _stage(accepted, model["dapo"], model["sft"],
                           lambda: sft(cfg, model["dapo"], out / "rs" / "accepted.jsonl", out / "sft", model["sft"]))
    mark("sft")
    evals["sft"] = evaluate_model(cfg, model["sft"], data["eval"], out / "eval_sft.json", True)
    mark("eval_sft")
    # stage 3: native parallel RL
    stages["papo"] = _stage(cfg.papo.steps, model["sft"], model["papo"],
                            lambda: reinforce(cfg, "papo", model["sft"], data["sample"], out / "papo", model["papo"]))
    mark("papo")
    evals["papo"] = evaluate_model(cfg, model["papo"], data["eval"], out / "eval_papo.json", True)
    mark("eval_papo")
    report = write_report(out, evals, stages, timings)
    mark("report")
    return report


def _stage(work: int, source: Path, target: Path, run) -> dict:
    """Run a model-making stage (`run()` returns its summary, which it also writes to
    target's run folder) unless its model exists. With no `work` (0 steps, no accepted sample)
    the stage is skipped and its model is the previous one: a symlink, so later stages and a
    resumed run see one folder per stage."""
    summary = target.parent / target.name.removeprefix("model_") / "summary.json"
    if target.exists() or target.is_symlink():
        return json.loads(summary.read_text()) if target.is_dir() and not target.is_symlink() else {"skipped": True}
    if not work:
        target.symlink_to(source.name)
        return {"skipped": True}
    return run()
