"""`npr launch` without a cluster: SLURM's variables -> the allocation and the env:// variables,
cluster settings, the `--dry-run` plan for 8 x 8 GPUs, paths and masters that cannot be reached
named, the preemption signal honoured at a step boundary, and requeue only after a stop."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_npr.launch.cluster import ClusterSettings
from megatron_npr.launch.rank import rank_env
from megatron_npr.launch.slurm import Allocation, AllocationError, engine_layout, gpus_per_node, srun_command

REPO = Path(__file__).resolve().parent.parent
FAKE = Path(__file__).parent / "fake_slurm"
NPR = [sys.executable, "-m", "megatron_npr.cli"]


def fake_env(tmp: Path, **extra) -> dict:
    (tmp / "fake").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPR_"))}
    return {**env, "PATH": f"{FAKE}:{env['PATH']}", "FAKE_SLURM_DIR": str(tmp / "fake"), "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "npr-papo", "SLURM_JOB_NODELIST": "gpu-[001-008]", "SLURM_JOB_NUM_NODES": "8",
            "SLURM_GPUS_ON_NODE": "8", "NPR_RUNS_DIR": str(tmp / "runs"), "NPR_PYTHON": sys.executable,
            "SLURM_SUBMIT_DIR": str(REPO), "PYTHONWARNINGS": "ignore", **extra}


def tiny_config(tmp: Path, **rl) -> Path:
    """An RL config whose input paths exist (the launcher only checks them)."""
    (tmp / "hf").mkdir(exist_ok=True)
    (tmp / "problems.jsonl").write_text("")
    path = tmp / "rl.yaml"
    path.write_text(yaml.safe_dump({"model": {"hf_dir": str(tmp / "hf")}, "data": {"path": str(tmp / "problems.jsonl")},
                                    "sampling": {"max_new_tokens": 64}, "rl": {"out_dir": str(tmp / "out"), **rl}}))
    return path


# ---------------------------------------------------------------- SLURM -> allocation and ranks
def test_allocation_from_slurm_variables(tmp_path):
    env = fake_env(tmp_path, SLURM_RESTART_COUNT="2")
    alloc = Allocation.from_env(env, ClusterSettings(), scontrol=str(FAKE / "scontrol"))
    assert alloc.hosts == [f"gpu-{i:03d}" for i in range(1, 9)] and alloc.world_size == 64
    assert alloc.master_addr == "gpu-001" and alloc.master_port(ClusterSettings()) == 15000 + 2 * 4242
    assert alloc.engine_port(ClusterSettings()) == alloc.master_port(ClusterSettings()) + 1
    assert alloc.master_port(ClusterSettings(master_port=29500)) == 29500 and alloc.restart_count == 2
    other = Allocation.from_env(env | {"SLURM_JOB_ID": "4243"}, ClusterSettings(), scontrol=str(FAKE / "scontrol"))
    assert other.master_port(ClusterSettings()) != alloc.master_port(ClusterSettings())


@pytest.mark.parametrize("change, message", [
    ({"SLURM_JOB_NUM_NODES": "4"}, "SLURM_JOB_NUM_NODES=4 but SLURM_JOB_NODELIST='gpu-[001-008]' names 8 hosts"),
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID not set"),
    ({"SLURM_GPUS_ON_NODE": None}, "cannot tell how many GPUs each node has"),
    ({"SLURM_GPUS_ON_NODE": "eight"}, "SLURM_GPUS_ON_NODE='eight'"),
])
def test_allocation_errors_name_the_variable(tmp_path, change, message):
    env = fake_env(tmp_path)
    for k, v in change.items():
        env.pop(k) if v is None else env.update({k: v})
    with pytest.raises(AllocationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Allocation.from_env(env, ClusterSettings(), scontrol=str(FAKE / "scontrol"))


def test_gpu_counts_engine_spread_and_task_variables():
    assert [gpus_per_node({"SLURM_GPUS_PER_NODE": v}, ClusterSettings()) for v in ("8", "h100:8", "gpu:h100:4")] \
        == [8, 8, 4]
    assert gpus_per_node({"SLURM_GPUS_ON_NODE": "8"}, ClusterSettings(gpus_per_node=2)) == 2
    assert engine_layout(8, 8) == (8, 1) and engine_layout(16, 8) == (8, 2) and engine_layout(2, 8) == (2, 1)
    with pytest.raises(AllocationError, match="rollout.engines=12 cannot spread evenly over 8 nodes"):
        engine_layout(12, 8)
    slurm = {"SLURM_PROCID": "13", "SLURM_NTASKS": "64", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
             "SLURM_NTASKS_PER_NODE": "8(x8)"}
    assert rank_env(slurm) == {"RANK": "13", "WORLD_SIZE": "64", "LOCAL_RANK": "5", "GROUP_RANK": "1",
                               "LOCAL_WORLD_SIZE": "8"}
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        rank_env({k: v for k, v in slurm.items() if k != "SLURM_PROCID"})


def test_cluster_settings_from_the_environment():
    s = ClusterSettings.from_env({"NPR_SOCKET_IFNAME": "ib0", "NPR_IB_HCA": "mlx5_0,mlx5_1",
                                  "NPR_SRUN_ARGS": "--container-image=img.sqsh --container-mounts=/data:/data",
                                  "NPR_NODE_SETUP": "/opt/site/setup.sh", "NPR_PREEMPT_SIGNAL": "USR2"})
    env = s.rank_env()
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ib0" and env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    assert env["NPR_PREEMPT_SIGNAL"] == "SIGUSR2" and env["NPR_STOP_ON_SIGTERM"] == "1"
    assert "NCCL_SOCKET_IFNAME" not in ClusterSettings.from_env({}).rank_env()
    cmd = srun_command(s, nodes=2, tasks_per_node=8, output="o-%N.log", kill_on_bad_exit=True, command=["python", "x"])
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=8", "--ntasks=16"]
    assert "--container-image=img.sqsh" in cmd
    assert cmd[-6:] == ["bash", "-c", 'source "$0" && exec "$@"', "/opt/site/setup.sh", "python", "x"]
    for bad, name in (({"NPR_MASTER_PORT": "80"}, "NPR_MASTER_PORT"), ({"NPR_PREEMPT_SIGNAL": "USR9"},
                      "NPR_PREEMPT_SIGNAL"), ({"NPR_RENDEZVOUS_TIMEOUT_S": "-1"}, "NPR_RENDEZVOUS_TIMEOUT_S"),
                      ({"NPR_GPUS_PER_NODE": "x"}, "NPR_GPUS_PER_NODE")):
        with pytest.raises(ValueError, match=name):
            ClusterSettings.from_env(bad)


# ---------------------------------------------------------------- the plan
def test_dry_run_prints_the_plan_for_8_nodes_x_8_gpus(tmp_path):
    """The real papo_64gpu.sh with --dry-run in a fake 8 x 8 allocation: hosts, ranks, layout,
    one engine per node with its memory share, paths (missing here: /checkpoints is a cluster's)."""
    out = subprocess.run(["bash", str(REPO / "slurm" / "papo_64gpu.sh"), "--dry-run", "--model", "qwen3-4b"],
                         env=fake_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    port = 15000 + 2 * 4242
    assert "hosts        8 x 8 GPUs, master gpu-001:%d" % port in text
    assert "ranks        64 = tp 4 x pp 1 x dp 16" in text
    for i in range(8):
        assert f"gpu-{i + 1:03d}        ranks {8 * i}-{8 * i + 7}, engine rank {i + 1}\n" in text
    assert f"8 sglang engine processes (tp 8), 1 per node on 8 nodes, sharing the GPUs; control at gpu-001:{port + 1}" \
        in text and "mem_fraction_static 0.45" in text
    assert "model.hf_dir = /checkpoints/npr_beta_4b/hf   [MISSING here]" in text
    assert "resume       none: a fresh start" in text
    assert "estimate" in text and "unavailable" not in text, text
    plan = json.loads((tmp_path / "runs" / "npr-papo-4242" / "plan.json").read_text())
    assert (plan["tp"], plan["dp"], plan["engines"], len(plan["hosts"])) == (4, 16, 8, 8)
    assert plan["rank_args"][-2:] == [f"rollout.port={port + 1}", "rollout.host=gpu-001"]
    assert not (tmp_path / "fake" / "srun.log").exists()  # nothing started


def test_dry_run_outside_slurm_and_layout_errors(tmp_path):
    cfg = tiny_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run([*NPR, "launch", "rl", str(cfg), "parallel.tp=2", "--dry-run", "--nodes", "2",
                          "--gpus-per-node", "4"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ranks        8 = tp 2 x pp 1 x dp 4" in out.stdout, out.stderr
    bad = subprocess.run([*NPR, "launch", "rl", str(cfg), "parallel.tp=3", "--dry-run", "--nodes", "2",
                          "--gpus-per-node", "4"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "8 ranks is not a multiple of parallel.tp x parallel.pp = 3 x 1" in bad.stderr
    none = subprocess.run([*NPR, "launch", "rl", str(cfg)], env=env, capture_output=True, text=True, timeout=120)
    assert none.returncode == 2 and "SLURM_JOB_ID and SLURM_JOB_NODELIST not set" in none.stderr


# ---------------------------------------------------------------- start-up failures are named
def test_a_missing_path_is_named_before_any_rank_starts(tmp_path):
    cfg = tiny_config(tmp_path)
    out = subprocess.run([*NPR, "launch", "rl", str(cfg), "data.path=/nfs/absent/orz.json"], env=fake_env(tmp_path),
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "data.path=/nfs/absent/orz.json" in out.stderr
    assert "shared file system" in out.stderr and not (tmp_path / "fake" / "srun.log").exists()


def test_a_rank_names_its_host_and_path_and_an_unreachable_master(tmp_path):
    """On a node without the path, the rank names both; a rank whose master never answers exits
    within NPR_RENDEZVOUS_TIMEOUT_S naming the address it tried (not a hang)."""
    from megatron_npr.distributed import free_port
    cfg = tiny_config(tmp_path)
    env = {**os.environ, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NPR_RENDEZVOUS_TIMEOUT_S": "3",
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*NPR, "launch-rank", "rl", str(cfg), "model.hf_dir=/scratch/absent"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "model.hf_dir=/scratch/absent does not exist" in out.stderr
    assert f"on host {os.uname().nodename} (rank 1)" in out.stderr
    start = time.monotonic()
    out = subprocess.run([*NPR, "launch-rank", "rl", str(cfg)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"rank 1 could not reach the master 127.0.0.1:{env['MASTER_PORT']} within 3 s" in out.stderr
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------- stop and requeue
def test_a_stop_signal_is_recorded_agreed_and_the_handler_restored(monkeypatch):
    from megatron_npr.training.preemption import StopRequest
    monkeypatch.delenv("NPR_STOP_ON_SIGTERM", raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequest.installed() as stop:
        assert signal.getsignal(signal.SIGTERM) != stop._handle  # SIGTERM only under `npr launch`
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal changes nothing
        assert stop.agreed() and stop.received == ["SIGUSR1", "SIGUSR1"]
    assert signal.getsignal(signal.SIGUSR1) == before
    monkeypatch.setenv("NPR_STOP_ON_SIGTERM", "1")
    with StopRequest.installed() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle


STUB_RANK = """#!/bin/sh
# stands in for the ranks' Python: what a run ends with, chosen by STUB_OUTCOME
if [ "$4" = engine ]; then [ "$STUB_OUTCOME" = engine_fails ] && exit 4; sleep 30; exit 0; fi
case "$STUB_OUTCOME" in
  stopped) [ "$SLURM_PROCID" = 0 ] && echo '{"preempted": true}' > "$NPR_PREEMPT_MARKER"; exit 0;;
  failed) [ "$SLURM_PROCID" = 1 ] && exit 3; sleep 30; exit 0;;
  engine_fails) sleep 30; exit 0;;
  *) exit 0;;
esac
"""


@pytest.mark.parametrize("outcome, code, requeued", [("stopped", 0, True), ("failed", 3, False),
                                                     ("finished", 0, False)])
def test_the_launcher_requeues_only_a_run_that_stopped_at_a_checkpoint(tmp_path, outcome, code, requeued):
    """A stub in place of the ranks' Python: the launcher requeues after a stop (the marker), passes
    a failed rank's code on (srun's --kill-on-bad-exit ends the sleeping rank at once), and leaves
    a finished run alone."""
    stub = tmp_path / "stub.sh"
    stub.write_text(STUB_RANK)
    stub.chmod(0o755)
    cfg = tiny_config(tmp_path)
    env = fake_env(tmp_path, SLURM_JOB_NODELIST="127.0.0.[1-2]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="2",
                   NPR_PYTHON=str(stub), STUB_OUTCOME=outcome)
    start = time.monotonic()
    out = subprocess.run([*NPR, "launch", "rl", str(cfg)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == code, out.stdout[-2000:] + out.stderr[-2000:]
    assert (tmp_path / "fake" / "requeued").is_file() == requeued
    assert time.monotonic() - start < 25
    if requeued:
        assert "job 4242 requeued" in out.stdout


def _agree(rank: int, port: int, signalled: bool, out) -> None:
    import torch.distributed as dist

    from megatron_npr.training.preemption import StopRequest
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with StopRequest.installed() as stop:
        first = stop.agreed()
        if signalled and rank == 1:  # the signal reaches one rank only
            os.kill(os.getpid(), signal.SIGUSR1)
        out.put((rank, first, stop.agreed()))
    dist.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step():
    import multiprocessing as mp

    from megatron_npr.distributed import free_port
    ctx = mp.get_context("spawn")
    for signalled in (True, False):  # the control: no signal, no stop
        out, port = ctx.Queue(), free_port()
        procs = [ctx.Process(target=_agree, args=(r, port, signalled, out)) for r in (0, 1)]
        for p in procs:
            p.start()
        results = sorted(out.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert results == [(0, False, signalled), (1, False, signalled)]


def test_an_engine_step_that_fails_ends_the_training_step(tmp_path):
    """The engines' srun step exits 4 at start-up: the launcher names it and stops the training
    step at once (rank 0 would otherwise wait rollout.timeout_s for engines that never come)."""
    stub = tmp_path / "stub.sh"
    stub.write_text(STUB_RANK)
    stub.chmod(0o755)
    cfg = tiny_config(tmp_path)
    env = fake_env(tmp_path, SLURM_JOB_NODELIST="127.0.0.[1-2]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="2",
                   NPR_PYTHON=str(stub), STUB_OUTCOME="engine_fails")
    start = time.monotonic()
    out = subprocess.run([*NPR, "launch", "rl", str(cfg), "rollout.placement=split", "rollout.launch=external",
                          "rollout.engines=2", "rollout.port=29600"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "the engine step exited 4 while training ran" in out.stdout, out.stdout[-2000:]
    assert time.monotonic() - start < 25 and not (tmp_path / "fake" / "requeued").exists()
    steps = [json.loads(line) for line in (tmp_path / "fake" / "srun.log").read_text().splitlines()]
    assert sorted(s[:3] for s in steps) == [["--nodes=2", "--ntasks-per-node=1", "--ntasks=2"],
                                            ["--nodes=2", "--ntasks-per-node=2", "--ntasks=4"]]
    assert all("--gpus-per-node=2" in s for s in steps)  # a GPU job: each task sees its node's GPUs


def test_convert_runs_as_one_task_and_names_a_missing_checkpoint(tmp_path):
    """`npr launch convert -- ARGS` (slurm/convert.sh): one srun task on the first node running
    convert_hf.py's arguments; a --ckpt that does not exist is named before srun."""
    stub = tmp_path / "stub.sh"
    stub.write_text('#!/bin/sh\necho "$@" > "$FAKE_SLURM_DIR/task_args"\n')
    stub.chmod(0o755)
    (tmp_path / "ckpt").mkdir()
    env = fake_env(tmp_path, NPR_PYTHON=str(stub), SLURM_GPUS_ON_NODE="", NPR_GPUS_PER_NODE="1")
    args = ["mcore-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]
    # (what slurm/convert.sh runs; the script itself would start the stub, which is NPR_PYTHON here)
    out = subprocess.run([*NPR, "launch", "convert", "--", *args], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    step = json.loads((tmp_path / "fake" / "srun.log").read_text())
    assert step[:3] == ["--nodes=1", "--ntasks-per-node=1", "--ntasks=1"] and "--gpus-per-node=1" not in step
    assert (tmp_path / "fake" / "task_args").read_text().split() == ["-m", "megatron_npr.cli", "launch-rank",
                                                                    "convert", *args]
    bad = subprocess.run([*NPR, "launch", "convert", "--", "mcore-to-hf", "--ckpt", "/nfs/absent", "--out",
                          str(tmp_path / "hf2")], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--ckpt=/nfs/absent" in bad.stderr
