"""`npr pipeline`: the recipe end to end on a tiny model, every stage visible here.

    tokenizer -> make model -> synth data -> bootstrap -> eval (before) -> rejection sampling -> SFT
    -> eval (after)

The tokenizer is chosen once (`tokenizer: tiny | qwen3 | folder`) and saved into the first model
folder; every later model folder carries it, and every stage (engine, `npr sft`) loads the
tokenizer of the model folder it is given.

Each stage writes its output under out_dir atomically and is skipped when that output exists,
so a killed pipeline resumes at the stage it was in (SFT and rejection sampling also resume
inside the stage).
"""
from __future__ import annotations

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


def evaluate_model(cfg: PipelineConfig, hf_dir: Path, eval_path: Path, out_json: Path) -> dict:
    """`npr eval` on the held-out set (greedy by default, parallel decoding, exact-integer grading)."""
    from ..eval.runner import EvalConfig, run_eval

    if out_json.is_file():
        return json.loads(out_json.read_text())
    e = cfg.eval
    result = run_eval(EvalConfig(engine=_engine(hf_dir), data=_synth_data(eval_path), sampling=e.sampling,
                                 grader=GraderSection(kind="exact_int"), batch_problems=e.batch_problems,
                                 measure_speedup=e.measure_speedup)).to_json()
    write_json_atomic(out_json, result, sort_keys=False)
    return result


def rejection_sample(cfg: PipelineConfig, hf_dir: Path, problems: Path, out: Path) -> dict:
    from ..training.rejection import RejectionConfig, run_rejection_sampling

    s = cfg.sample
    rs = RejectionConfig(engine=_engine(hf_dir), data=_synth_data(problems), out=str(out), sampling=s.sampling,
                         max_samples=s.max_samples, batch_problems=s.batch_problems)
    return run_rejection_sampling(rs).to_json()


def sft(cfg: PipelineConfig, hf_dir: Path, data: Path, out: Path, export: Path) -> dict:
    """`npr sft` in a child process: the same command a user runs, and Megatron's process state
    (CPU shim, process group, checkpoint workers) stays out of the engine's process."""
    import subprocess
    import sys

    import yaml

    from ..config import config_to_dict
    from ..io import atomic_write_text
    from ..sections import ModelSection
    from ..training.sft_config import SFTConfig, SFTDataSection, TrainSection

    s = cfg.sft
    sft_cfg = SFTConfig(model=ModelSection(hf_dir=str(hf_dir)),
                        data=SFTDataSection(path=str(data), max_tokens=s.max_tokens, instruction="none"),
                        train=TrainSection(out_dir=str(out), epochs=s.epochs, global_batch_rows=s.global_batch_rows,
                                           export_hf=str(export)),
                        optim=s.optim)
    config_path = atomic_write_text(out / "sft.yaml", yaml.safe_dump(config_to_dict(sft_cfg), sort_keys=False))
    subprocess.run([sys.executable, "-m", "megatron_npr.cli", "sft", str(config_path)], check=True)
    return json.loads((out / "summary.json").read_text())


def run_pipeline(cfg: PipelineConfig) -> dict:
    from ..data.tokenizer import load_vocab
    from ..training.sft_data import load_sft_samples
    from .bootstrap import bootstrap_tiny
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
    init_dir, boot_dir, sft_dir = out / "model_init", out / "model_bootstrap", out / "model_sft"
    make_model(cfg, vocab, init_dir)
    mark("model")
    data = make_data(cfg, out)
    mark("data")
    if not boot_dir.is_dir():
        samples, drops = load_sft_samples(data["bootstrap"], vocab, max_tokens=cfg.bootstrap.max_tokens,
                                          instruction="")
        b = cfg.bootstrap
        boot = bootstrap_tiny(init_dir, samples, boot_dir, steps=b.steps, lr=b.lr, rows_per_step=b.rows_per_step,
                              max_tokens=b.max_tokens, seed=cfg.synth.seed)
        write_json_atomic(out / "bootstrap.json", boot, indent=None, sort_keys=False)
    mark("bootstrap")
    before = evaluate_model(cfg, boot_dir, data["eval"], out / "eval_before.json")
    mark("eval_before")
    rs = rejection_sample(cfg, boot_dir, data["sample"], out / "rs" / "accepted.jsonl")
    mark("sample")
    if rs["accepted"] == 0:  # nothing to fine-tune on: say so, and evaluate the bootstrap model again
        print("[pipeline] rejection sampling accepted no sample: SFT skipped", flush=True)
        rs["sft_skipped"] = True
        sft_dir = boot_dir
    elif not sft_dir.is_dir():
        sft(cfg, boot_dir, out / "rs" / "accepted.jsonl", out / "sft", sft_dir)
    mark("sft")
    after = evaluate_model(cfg, sft_dir, data["eval"], out / "eval_after.json")
    mark("eval_after")
    report = write_report(out, before, after, rs, timings)
    mark("report")
    return report
