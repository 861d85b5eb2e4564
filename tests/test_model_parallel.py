"""Multi-rank model checks: torchrun (gloo, CPU) launches tests/workers/parallel_model.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_npr.distributed import free_port
from model_fixtures import tiny_hf_model

WORKER = Path(__file__).parent / "workers" / "parallel_model.py"
TOL = 1e-5
pytestmark = pytest.mark.multirank


def launch(script: Path, nproc: int, *args: str, timeout: int = 900) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for tied in (False, True):
        tiny_hf_model(tied=tied).save_pretrained(root / f"tied{int(tied)}")
    return root


@pytest.mark.parametrize("tp,pp,tied", [(2, 1, False), (1, 2, True), (2, 2, False)])
def test_logits_match_hf_at_tp_pp(hf_dirs, tmp_path, tp, pp, tied):
    out = tmp_path / "result.json"
    extra = ["--sgd-step"] if (tp, pp) == (2, 1) else []
    launch(WORKER, tp * pp, "--hf-dir", str(hf_dirs / f"tied{int(tied)}"), "--tp", str(tp), "--pp", str(pp),
           "--out", str(out), *extra)
    result = json.loads(out.read_text())
    assert result["logits_max_diff"] <= TOL, result
    if extra:  # one SGD step at TP=2 and at TP=1 from the same weights
        a, b = result["sgd_tp2"], result["sgd_tp1"]
        assert abs(a["loss"] - b["loss"]) <= TOL and abs(a["grad_norm"] - b["grad_norm"]) <= TOL, result
        w2, w1 = torch.load(f"{out}.tp2.pt"), torch.load(f"{out}.tp1.pt")
        assert sorted(w2) == sorted(w1)
        assert max((w2[k] - w1[k]).abs().max().item() for k in w2) <= TOL
        assert a["max_update"] > 100 * TOL  # negative control: the step moved weights far beyond TOL
