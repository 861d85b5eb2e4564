"""The GPU check's plumbing, on the CPU: the model-step benchmark at a tiny size, the batch it
builds, and tools/gpu_check.sh in dry-run mode (steps printed and summarised, none run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import load_tool

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"bench", "backend", "device", "dtype", "pass", "rows", "seq", "tokens", "loss_tokens", "params",
            "loss", "first_step_s", "ms", "tokens_per_s", "approx_tflops_per_s", "mask_ms", "visible_pairs"}
STEPS = ["install_wheels", "nvidia_smi", "import_check", "pytest", "model_step", "attention", "engine", "sync"]


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHON": sys.executable, **extra}
    return env


def _bench_module():
    return load_tool("bench_model_step")


def test_bench_model_step_tiny_cpu_prints_json_rows():
    proc = subprocess.run([sys.executable, "tools/bench_model_step.py", "--device", "cpu", "--tiny"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    steps = {r["backend"]: r for r in rows if r["bench"] == "model_step"}
    assert set(steps) == {"sdpa", "flex"}, proc.stdout
    for backend, row in steps.items():
        assert ROW_KEYS <= row.keys(), (backend, ROW_KEYS - row.keys())
        assert "error" not in row and row["ms"] > 0 and row["tokens_per_s"] > 0
        assert row["tokens"] == 2 * 256 and 0 < row["loss_tokens"] < row["tokens"]
        assert 0.1 < row["visible_pairs"] < 0.9  # branches hide each other: fewer pairs than causal
    assert steps["sdpa"]["pass"] == "fwd+bwd" and steps["flex"]["pass"] == "fwd"  # no flex backward on CPU
    check = next(r for r in rows if r["bench"] == "model_step_check")
    assert check["max_rel_diff"] < 1e-4  # same weights, same batch: both backends give the same loss


def test_bench_batch_is_packed_npr_and_device_mask_matches_dense_mask():
    bench = _bench_module()
    batch = bench.make_batch(rows=2, seq=512, docs=4, vocab=256)
    assert batch.tokens.shape == (2, 512) and all(len(o) == 5 for o in batch.doc_offsets)
    assert torch.equal(bench._visible(batch), batch.dense_mask())  # the workaround's mask is the same
    moved, note = bench.to_device(batch, "cpu")
    assert note is None and torch.equal(moved.tokens, batch.tokens)
    big = bench.make_batch(rows=2, seq=4096, docs=4, vocab=151936)  # the GPU default packs too
    assert big.tokens.shape == (2, 4096) and int(big.tokens.max()) < 151936


def test_gpu_check_dry_run_lists_steps_and_writes_summary(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for name in ("megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl", "math_verify-0.9.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=_env(OUT=str(out), GPU_CHECK_WHEELS=str(wheels),
                                                GPU_CHECK_FORCE_INSTALL="1", GPU_CHECK_STEPS="pytest model_step"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = [line for line in proc.stdout.splitlines() if line.startswith("[dry-run]")]
    assert [line.split()[1] for line in printed] == ["install_wheels", "nvidia_smi", "import_check", "pytest",
                                                      "model_step"]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["torch"] == torch.__version__ and summary["date"]
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == STEPS
    install = steps["install_wheels"]["command"]
    assert "pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site" in install
    assert "math_verify-0.9.0-py3-none-any.whl" in install and "megatron_core-0.16.1" in install
    assert "-m gpu" in steps["pytest"]["command"] and "--junitxml" in steps["pytest"]["command"]
    assert "tools/bench_model_step.py --device cuda" in steps["model_step"]["command"]
    for name in ("install_wheels", "nvidia_smi", "import_check", "pytest", "model_step"):
        assert steps[name]["status"] == "dry_run" and steps[name]["rc"] is None, steps[name]
    for name in ("attention", "engine", "sync"):  # left out by GPU_CHECK_STEPS
        assert steps[name]["status"] == "not_selected"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and {p.name for p in files} <= {"gpu_check.json", "env.log"}


@pytest.mark.skipif(not Path("/usr/bin/timeout").exists() and not Path("/bin/timeout").exists(),
                    reason="needs coreutils timeout")
def test_gpu_check_runs_a_failing_step_and_records_its_exit_code(tmp_path):
    """A real (not dry) run whose one benchmark fails at once on a CPU: the failure is recorded,
    the script goes on and still writes the summary."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=_env(OUT=str(out), GPU_CHECK_STEPS="model_step", GPU_CHECK_SKIP_SETUP="1",
                                   CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    step = next(s for s in summary["steps"] if s["name"] == "model_step")
    assert step["status"] == "failed" and step["rc"] == 2 and step["seconds"] > 0 and step["results"] == []
    assert "torch sees no GPU" in (out / "bench_model_step.log").read_text()
