"""The real `slurm/papo_64gpu.sh` on a fake SLURM (tests/fake_slurm: srun, scontrol on PATH) with
2 simulated nodes x 2 ranks on this machine (hosts 127.0.0.1 and 127.0.0.2, gloo) and one engine
per node: a tiny PAPO run is preempted by the batch step's signal, checkpoints, requeues itself,
and the requeued attempt resumes to the single-process run's metrics."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from rl_scripted import rl_config, scripted_engine, write_tiny_setup  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FAKE = Path(__file__).parent / "fake_slurm"
EXACT = ("reward_mean", "accuracy", "npr_format_rate", "response_tokens", "trained_rollouts", "weight_version")
ENGINES = ("rollout.placement=split", "rollout.launch=external", "rollout.engines=2", "rollout.timeout_s=120",
           "rollout.engine_factory=rl_scripted:scripted_engine_of")


def slurm_env(tmp: Path, job_id: str, nodelist: str, gpus: str, **extra) -> dict:
    from megatron_npr.distributed import free_port
    (tmp / "fake").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPR_"))}
    return {**env, "PATH": f"{FAKE}:{env['PATH']}", "FAKE_SLURM_DIR": str(tmp / "fake"), "SLURM_JOB_ID": job_id,
            "SLURM_JOB_NAME": "npr-test", "SLURM_JOB_NODELIST": nodelist, "SLURM_SUBMIT_DIR": str(REPO),
            "NPR_GPUS_PER_NODE": gpus, "NPR_RUNS_DIR": str(tmp / "runs"), "NPR_PYTHON": sys.executable,
            "NPR_MASTER_PORT": str(free_port()), "NPR_RENDEZVOUS_TIMEOUT_S": "120", "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "workers"), str(REPO)]),
            **extra}


def rows(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen, megatron):
    return write_tiny_setup(tmp_path_factory.mktemp("slurm"), qwen[0])


@pytest.fixture(scope="module")
def single_process(tiny, vocab, tmp_path_factory):
    """The reference: the same config, one process, the engine in it, never interrupted."""
    from megatron_npr.config import load_config
    from megatron_npr.rl.config import RLConfig
    from megatron_npr.rl.loop import run_rl

    import yaml
    tmp = tmp_path_factory.mktemp("reference")
    path = tmp / "papo.yaml"
    path.write_text(yaml.safe_dump(rl_config(*tiny, tmp / "out", "papo", steps=2)))
    cfg = load_config(RLConfig, path, [])
    run_rl(cfg, progress=False, engine=scripted_engine(cfg, vocab), vocab=vocab)
    return rows(tmp / "out")


@pytest.mark.multirank
def test_papo_64gpu_script_on_two_fake_nodes_is_preempted_requeued_and_resumes(tiny, single_process, tmp_path):
    import yaml
    out = tmp_path / "out"
    config = tmp_path / "papo.yaml"
    config.write_text(yaml.safe_dump(rl_config(*tiny, out, "papo", steps=2) | {"rollout": {"port": 29600}}))
    env = slurm_env(tmp_path, "777", "127.0.0.[1-2]", "2")
    cmd = ["bash", str(REPO / "slurm" / "papo_64gpu.sh"), str(config), *ENGINES]
    log_dir = tmp_path / "runs" / "npr-test-777"

    with (tmp_path / "attempt1.out").open("w") as stdout:  # attempt 1: preempted after step 1
        launcher = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, cwd=tmp_path,
                                    start_new_session=True)
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the run has started (its metrics file exists): step 1 is under way
        launcher.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@900` does
        code = launcher.wait(timeout=300)
    text = (tmp_path / "attempt1.out").read_text()
    assert code == 0, text[-4000:]
    assert [r["step"] for r in rows(out)] == [1]  # stopped after step 1 of 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert (tmp_path / "fake" / "requeued").read_text().split() == ["777"]
    assert "SIGUSR1 received" in text and "job 777 requeued" in text

    # the launch as SLURM saw it: 2 nodes x 2 ranks, one engine per node, per-node logs by rank
    steps = [json.loads(line) for line in (tmp_path / "fake" / "srun.log").read_text().splitlines()]
    assert sorted(s[:3] for s in steps) == [["--nodes=2", "--ntasks-per-node=1", "--ntasks=2"],
                                            ["--nodes=2", "--ntasks-per-node=2", "--ntasks=4"]]
    node_logs = {p.name: p.read_text() for p in log_dir.glob("node-*.log")}
    assert sorted(node_logs) == ["node-127.0.0.1.log", "node-127.0.0.2.log"]
    assert "\n0: " in "\n" + node_logs["node-127.0.0.1.log"] and "\n3: " in "\n" + node_logs["node-127.0.0.2.log"]
    assert sorted(p.name for p in log_dir.glob("engines-*.log")) == ["engines-127.0.0.1.log", "engines-127.0.0.2.log"]
    plan = json.loads((log_dir / "plan.json").read_text())
    assert (plan["tp"], plan["pp"], plan["dp"], plan["engines"], plan["engines_per_node"]) == (1, 1, 4, 2, 1)

    env["SLURM_RESTART_COUNT"] = "1"  # attempt 2: the requeued job
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "resume       from step 1" in done.stdout and "attempt 2" in done.stdout
    final = rows(out)
    assert [r["step"] for r in final] == [1, 2]
    assert (tmp_path / "fake" / "requeued").read_text().split() == ["777"]  # not requeued again
    for a, b in zip(final, single_process):
        assert {k: a[k] for k in EXACT} == {k: b[k] for k in EXACT}, (a, b)
        for k in ("pg_loss", "grad_norm", "sampled_nll"):  # fp32 rounding of the DP4 batch split only
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(b[k])), (k, a[k], b[k])
        assert a["mismatch_max"] <= 1e-5
    assert sum(r["trained_rollouts"] for r in final) > 0
