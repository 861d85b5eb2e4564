"""Packed parallel SFT: packing never changes the loss, runs resume to the same curve, and TP2 /
DP2 train like TP1. The model is a tiny random Qwen3 over the real Qwen3 vocabulary."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_npr.data.synth import make_synth_dataset
from megatron_npr.distributed import free_port
from harness import run_in_session

SEQ = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen):
    """(hf_dir, data_path): a 2-layer 32-wide random Qwen3 and 24 synthetic NPR solutions."""
    from megatron_npr.checkpoint.tiny import TinyQwen3, write_random_qwen3

    root = tmp_path_factory.mktemp("sft")
    tokenizer, _ = qwen
    hf_dir = write_random_qwen3(root / "hf", tokenizer, TinyQwen3(hidden_size=32, num_hidden_layers=2,
                                                                  head_dim=16, intermediate_size=64, seed=3))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(p.to_json() | {"solution": s}) + "\n"
                            for p, s in make_synth_dataset(24, (2, 3), 1, seed=5)))
    return hf_dir, data


def _samples(tiny, vocab, n=6):
    from megatron_npr.training.sft_data import load_sft_samples
    samples, drops = load_sft_samples(tiny[1], vocab, max_tokens=SEQ, instruction="")
    assert drops.kept == len(samples) == 24
    return samples[:n]


def _batch(samples, length):
    from megatron_npr.models import NPRBatch
    from megatron_npr.topology import pack
    rows = pack(samples, length)
    return NPRBatch.from_rows(rows, length=length), rows


def test_packed_logprobs_equal_unpacked_hf_reference(megatron, tiny, vocab):
    """Per-token log-probs of several documents packed in one row (Megatron) equal each document
    alone under HF with its dense NPR mask; the summed loss agrees to 1e-5 relative. Negative
    control: letting documents see each other changes the later documents."""
    from transformers import Qwen3ForCausalLM

    from megatron_npr.checkpoint import open_hf_weights, read_hf_config
    from megatron_npr.checkpoint.megatron_io import load_hf_into_model
    from megatron_npr.models import build_model, token_logprobs, transformer_config_from_hf
    from model_fixtures import additive_mask

    hf_dir, _ = tiny
    samples = _samples(tiny, vocab)
    cfg = read_hf_config(hf_dir)
    model = build_model(transformer_config_from_hf(cfg, dtype=torch.float32))
    with open_hf_weights(hf_dir) as w:
        load_hf_into_model(model, w, cfg)
    hf = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    batch, rows = _batch(samples, SEQ)
    assert len(rows) == 2 and all(len(r.sample_indices) >= 2 for r in rows)
    with torch.no_grad():
        packed = token_logprobs(model, batch)
        _, valid = batch.targets()
        packed_loss = -(packed * valid).sum()
        ref_loss, worst = 0.0, 0.0
        for r, row in enumerate(rows):
            for k, i in enumerate(row.sample_indices):
                lo, hi = row.doc_offsets[k], row.doc_offsets[k + 1]
                alone, _ = _batch([samples[i]], hi - lo)
                logits = hf(input_ids=alone.tokens, attention_mask=additive_mask(alone.dense_mask()),
                            position_ids=alone.position_ids).logits.double()
                targets, ok = alone.targets()
                ref = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
                worst = max(worst, (packed[r, lo:hi].double() - ref[0])[ok[0]].abs().max().item())
                assert torch.equal(valid[r, lo:hi], ok[0])
                ref_loss += -(ref * ok).sum().item()
        assert worst <= 1e-5, worst
        assert abs(packed_loss.item() - ref_loss) <= 1e-5 * abs(ref_loss)
        leaky = dataclass_replace(batch, doc_start=torch.zeros_like(batch.doc_start))
        moved = (token_logprobs(model, leaky) - packed)[valid].abs().max().item()
    assert moved > 1e-3, moved


def dataclass_replace(obj, **changes):
    import dataclasses
    return dataclasses.replace(obj, **changes)


# ---------------------------------------------------------------- runs of `npr sft`
def _config(tiny, out_dir, **train) -> dict:
    hf_dir, data = tiny
    return {"model": {"hf_dir": str(hf_dir)},
            "data": {"path": str(data), "max_tokens": SEQ, "instruction": "none"},
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "weight_decay": 0.1, "clip_grad": 1.0},
            "train": {"out_dir": str(out_dir), "steps": 5, "global_batch_rows": 2, "save_every": 2, **train}}


NO_SPAWN_CLI = Path(__file__).parent / "workers" / "no_spawn_cli.py"  # `npr` that may not start processes


def run_sft(cfg: dict, tmp: Path, *overrides: str, nproc: int = 1, crash: str | None = None,
            expect: int = 0, no_spawn: bool = False) -> list[dict]:
    path = tmp / f"cfg_{abs(hash((str(cfg), overrides))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("NPR_TEST_CRASH", None)
    env.pop("NPR_TEST_SIGNAL", None)
    if crash:
        env["NPR_TEST_SIGNAL" if crash.startswith("signal ") else "NPR_TEST_CRASH"] = crash.removeprefix("signal ")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"] if nproc > 1 else [sys.executable]
    entry = [str(NO_SPAWN_CLI)] if no_spawn else ["-m", "megatron_npr.cli"]
    cmd = [*launcher, *entry, "sft", str(path), *overrides, "--quiet"]
    log = path.with_suffix(".log")
    code = run_in_session(cmd, log, env)
    if expect == 0:
        assert code == 0, f"{' '.join(cmd)}:\n{log.read_text()[-6000:]}"
    else:
        assert code == expect, log.read_text()[-3000:]
    metrics = Path(cfg["train"]["out_dir"]) / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []


def _curve(rows, key="loss"):
    return [r[key] for r in rows]


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    """An uninterrupted TP1 run, and a run with another data order (the negative control)."""
    tmp = tmp_path_factory.mktemp("ref")
    base = run_sft(_config(tiny, tmp / "a", export_hf=str(tmp / "a_hf")), tmp)
    other = run_sft(_config(tiny, tmp / "b", seed=99), tmp)
    assert len(base) == 5 and [r["step"] for r in base] == [1, 2, 3, 4, 5]
    gap = max(abs(x - y) for x, y in zip(_curve(base)[1:], _curve(other)[1:]))
    assert gap > 1e-3, "another data order should give another curve"
    return base, tmp / "a"


def _assert_export_equals_the_converter(exported_dir: Path, checkpoint: Path) -> dict:
    """tools/convert_hf.py mcore-to-hf on `checkpoint` gives exactly the tensors in `exported_dir`."""
    from safetensors.torch import load_file
    converted = exported_dir.parent / f"{exported_dir.name}_converted"
    cmd = [sys.executable, str(Path(__file__).parent.parent / "tools" / "convert_hf.py"), "mcore-to-hf",
           "--ckpt", str(checkpoint), "--out", str(converted)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    exported = load_file(exported_dir / "model.safetensors")
    reference = load_file(converted / "model.safetensors")
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in exported)
    return exported


def test_export_hf_equals_the_converter_on_the_final_checkpoint(tiny, reference_run):
    """`train.export_hf` (in process) writes what tools/convert_hf.py makes of the final
    checkpoint, bit for bit; and training moved the weights away from the start."""
    from safetensors.torch import load_file
    _, out = reference_run
    exported = _assert_export_equals_the_converter(out.parent / "a_hf", out / "checkpoints" / "step_00000005")
    start = load_file(Path(tiny[0]) / "model.safetensors")
    assert (exported["model.norm.weight"] - start["model.norm.weight"]).abs().max() > 1e-3
    assert (out.parent / "a_hf" / "tokenizer.json").is_file()


def test_sft_writes_checkpoints_metrics_and_plot(reference_run):
    base, out = reference_run
    assert base[-1]["loss"] < base[0]["loss"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_00000004", "step_00000005"]  # keep_last=2
    assert (out / "loss.png").is_file() and any((out / "tensorboard").iterdir())
    assert 0 < base[0]["packing_efficiency"] <= 1 and base[0]["lr"] > 0


def test_a_stopped_run_and_a_kill_during_a_save_resume_to_the_same_curve(tiny, tmp_path, reference_run):
    """SIGUSR1 after step 3 (no save due), and again while step 3's checkpoint is written: the run
    saves step 3 and exits 75 (PREEMPTED_EXIT). The rerun is killed (os._exit) in the middle of
    writing step 4's checkpoint: `latest` still names step 3, the half-written folder is left. The
    third run removes it, resumes from step 3 and follows the uninterrupted curve."""
    base, _ = reference_run
    cfg = _config(tiny, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    stopped = run_sft(cfg, tmp_path, crash="signal after_step:3,during_save:3", expect=75)
    assert [r["step"] for r in stopped] == [1, 2, 3]
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    killed = run_sft(cfg, tmp_path, crash="during_save:4", expect=17)
    assert [r["step"] for r in killed] == [1, 2, 3, 4]
    assert (ckpts / "latest").read_text().strip() == "step_00000003" and list(ckpts.glob(".step_*"))
    resumed = run_sft(cfg, tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert not list(ckpts.glob(".step_*"))
    for key in ("loss", "grad_norm", "lr"):
        assert max(abs(x - y) for x, y in zip(_curve(base, key), _curve(resumed, key))) <= 1e-6, key


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.tp=1"])  # TP2, then DP2 (2 ranks, tp=1)
def test_tp2_and_dp2_follow_the_tp1_curve(tiny, tmp_path, reference_run, layout):
    """At TP2 the run also exports an HF folder: gathered in process (the workers may not start a
    child process), bitwise what the converter makes of the final checkpoint."""
    base, _ = reference_run
    tp2 = layout == "parallel.tp=2"
    cfg = _config(tiny, tmp_path / "run", save_every=0, **({"export_hf": str(tmp_path / "hf")} if tp2 else {}))
    curve = run_sft(cfg, tmp_path, layout, nproc=2, no_spawn=tp2)
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5]
    diff = max(abs(x - y) for x, y in zip(_curve(base), _curve(curve)))
    assert diff <= 1e-4, diff
    if tp2:
        _assert_export_equals_the_converter(tmp_path / "hf", tmp_path / "run" / "checkpoints" / "step_00000005")
        assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_no_spawn_cli_refuses_child_processes():
    """The control for the TP2 export above: under tests/workers/no_spawn_cli.py a child process
    (as the old export through the converter started) fails."""
    code = f"import runpy, subprocess; runpy.run_path({str(NO_SPAWN_CLI)!r}); subprocess.run(['true'])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "may not start child processes" in res.stderr


def test_pipeline_sft_stage(tiny, tmp_path):
    """The pipeline's SFT stage (`npr sft` in a child process, from a config it writes) trains,
    checkpoints and exports an HF folder the engine can load."""
    from megatron_npr.pipeline.config import PipelineConfig
    from megatron_npr.pipeline.run import sft
    from megatron_npr.rollout import NPREngine

    hf_dir, data = tiny
    cfg = PipelineConfig()
    cfg.sft.max_tokens, cfg.sft.epochs = SEQ, 1
    summary = sft(cfg, hf_dir, data, tmp_path / "sft", tmp_path / "hf")
    assert summary["steps"] >= 2 and summary["dropped"]["kept"] == 24
    assert (tmp_path / "sft" / "checkpoints" / "latest").is_file()
    NPREngine.from_hf(tmp_path / "hf")
