"""`npr rl` with its engines on ranks of their own (`rollout.placement: split`): the same metrics
as the colocated run on the same seeds, every step's mismatch <= 1e-5 (the weights reach the
engine ranks), with one trainer rank in this process and with 2 trainer ranks under torchrun."""
import functools
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from harness import run_in_session  # noqa: E402
from rl_scripted import rl_config, scripted_engine, scripted_engine_from_config, write_tiny_setup  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "rl_scripted.py"
EXACT = ("reward_mean", "accuracy", "npr_format_rate", "response_tokens", "trained_rollouts", "weight_version")
SPLIT = ("rollout.placement=split", "rollout.engines=2", "rollout.timeout_s=120")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen, megatron):
    return write_tiny_setup(tmp_path_factory.mktemp("rl_group"), qwen[0])


def config_file(tiny, out: Path, tmp: Path) -> Path:
    import yaml
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(rl_config(*tiny, out, "papo", steps=3)))
    return path


def rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(split: list[dict], colocated: list[dict]) -> None:
    assert [r["step"] for r in split] == [r["step"] for r in colocated] == [1, 2, 3]
    for a, b in zip(split, colocated):
        assert {k: a[k] for k in EXACT} == {k: b[k] for k in EXACT}, (a, b)
        for k in ("pg_loss", "grad_norm", "sampled_nll"):  # fp32 rounding of other batch shapes only
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(b[k])), (k, a[k], b[k])
        assert a["mismatch_max"] <= 1e-5 and a["trained_rollouts"] > 0


@pytest.fixture(scope="module")
def colocated(tiny, vocab, tmp_path_factory):
    from megatron_npr.config import load_config
    from megatron_npr.rl.config import RLConfig
    from megatron_npr.rl.loop import run_rl

    tmp = tmp_path_factory.mktemp("colocated")
    cfg = load_config(RLConfig, config_file(tiny, tmp / "out", tmp), [])
    run_rl(cfg, progress=False, engine=scripted_engine(cfg, vocab), vocab=vocab)
    return rows(tmp / "out")


def test_split_engines_give_the_colocated_metrics(tiny, vocab, colocated, tmp_path):
    """One trainer rank here, two spawned engine ranks: prompts spread over them, weights over gloo."""
    from megatron_npr.config import load_config
    from megatron_npr.rl.config import RLConfig
    from megatron_npr.rl.loop import run_rl

    path = config_file(tiny, tmp_path / "out", tmp_path)
    cfg = load_config(RLConfig, path, list(SPLIT))
    summary = run_rl(cfg, progress=False, vocab=vocab,
                     engine_factory=functools.partial(scripted_engine_from_config, str(path), SPLIT))
    split = rows(tmp_path / "out")
    assert_same_metrics(split, colocated)
    assert all(r["sync_tensors"] > 0 for r in split) and summary["weight_version"] == 3


def test_a_skipped_sync_on_an_engine_rank_shows_in_the_mismatch(tiny, vocab, tmp_path):
    """Negative control: engine ranks that silently ignore the first update (say they loaded it)
    disagree with the trainer."""
    from megatron_npr.config import load_config
    from megatron_npr.rl.config import RLConfig
    from megatron_npr.rl.loop import run_rl

    path = config_file(tiny, tmp_path / "out", tmp_path)
    overrides = (*SPLIT, "rl.steps=2")
    cfg = load_config(RLConfig, path, list(overrides))
    run_rl(cfg, progress=False, vocab=vocab,
           engine_factory=functools.partial(scripted_engine_from_config, str(path), overrides, 2))
    assert rows(tmp_path / "out")[1]["mismatch_max"] > 1e-3


@pytest.mark.multirank
def test_two_trainer_ranks_and_two_engine_ranks_then_an_engine_dies(tiny, colocated, tmp_path):
    """torchrun with 2 trainer ranks (DP2); rank 0 spawns 2 engine ranks (split, gloo). Step 1 gives
    the single-process run's metrics; engine rank 2 dies in step 2: both trainer ranks fail, naming
    it, instead of hanging, with step 1's checkpoint kept. (Resuming a multi-rank run with engine
    ranks to the single-process metrics: tests/test_slurm_launch.py.)"""
    from megatron_npr.distributed import free_port

    path = config_file(tiny, tmp_path / "out", tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(WORKER), str(path), *SPLIT, "rl.save_every=1", "--engine-dies-at", "2"]
    log = tmp_path / "run.log"
    code = run_in_session(cmd, log, env, timeout=300)
    text = log.read_text()
    assert code != 0 and "exited with code 5" in text, text[-5000:]
    for rank in (0, 1):  # every trainer rank raises, naming the engine (not a broken collective)
        assert f"[rank{rank}]: megatron_npr.rl.rollouts.RolloutError: on the engine's rank: " \
               "EngineGroupError: engine rank 2" in text, text[-5000:]
    step1 = rows(tmp_path / "out")
    assert [r["step"] for r in step1] == [1]
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert {k: step1[0][k] for k in EXACT} == {k: colocated[0][k] for k in EXACT}
    assert step1[0]["mismatch_max"] <= 1e-5 and abs(step1[0]["pg_loss"] - colocated[0]["pg_loss"]) <= 1e-4


def test_engine_rank_out_of_range_is_refused(tiny, tmp_path):
    """`npr engine --rank K` with K outside 1..rollout.engines exits 2 naming the range. (An
    external engine rank serving a run: tests/test_slurm_launch.py, through `npr launch`.)"""
    import subprocess

    path = config_file(tiny, tmp_path / "out", tmp_path)
    overrides = ["rollout.placement=split", "rollout.launch=external", "rollout.engines=1", "rollout.port=29600"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    bad = subprocess.run([sys.executable, "-m", "megatron_npr.cli", "engine", str(path), *overrides, "--rank", "2"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "engine ranks are 1..rollout.engines=1" in bad.stderr


class Recorder:
    """A backend that records the calls the RL loop's RolloutManager makes."""

    def __init__(self, fail_at: str | None = None):
        self.calls, self.fail_at = [], fail_at

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, *[a if isinstance(a, int) or a == [[1]] or name == "resume_memory" else "..."
                                       for a in args]))
            if name == self.fail_at:
                raise RuntimeError(f"{name} failed")
            return [] if name == "generate" else len(args[0]) if name == "update_weights" else None
        return call


class TwoBuckets:
    def hf_tensors(self, bucket_bytes):
        import torch
        yield [("a", torch.zeros(2)), ("b", torch.zeros(3))]
        yield [("c", torch.zeros(1))]


def test_the_manager_drives_a_backend_in_sglangs_colocation_order():
    """generate -> release(all) -> [train] -> resume(weights) -> begin -> buckets -> end(v) ->
    resume(kv_cache, cuda_graph) -> generate; the version reaches end_weight_update and the rollouts."""
    from megatron_npr.rl.rollouts import RolloutError, RolloutManager
    from megatron_npr.rollout import SamplingParams

    backend = Recorder()
    manager = RolloutManager(lambda: backend, lambda: None)
    manager.generate([[1]], SamplingParams(), [0])
    manager.release_memory()
    out = manager.sync(TwoBuckets(), 4)
    manager.generate([[1]], SamplingParams(), [0])
    assert backend.calls == [("generate", [[1]], "..."), ("release_memory",), ("resume_memory", ["weights"]),
                             ("begin_weight_update",), ("update_weights", "..."), ("update_weights", "..."),
                             ("end_weight_update", 4), ("resume_memory", ["kv_cache", "cuda_graph"]),
                             ("generate", [[1]], "...")]
    assert out["sync_tensors"] == 3 and manager.version == 4
    failing = RolloutManager(lambda: Recorder(fail_at="update_weights"), lambda: None)
    with pytest.raises(RolloutError, match="update_weights failed"):
        failing.sync(TwoBuckets(), 1)
    assert failing.version == 0


@pytest.mark.parametrize("overrides, message", [
    (["rollout.engines=2"], "rollout.engines=2 needs rollout.placement=split"),
    (["rollout.placement=split", "rollout.launch=external"], "needs a fixed rollout.port"),
    (["rollout.join=exact"], "rollout.join=exact needs the NPR join plugin for SGLang, which has not run on a GPU"),
    (["rollout.placement=split", "rollout.engines=0"], "invalid rollout.engines=0"),
    (["rollout.timeout_s=0"], "invalid rollout.timeout_s=0"),
    (["rollout.placement=nowhere"], "rollout.placement"),
])
def test_rollout_section_errors_name_the_key(tiny, tmp_path, overrides, message):
    from megatron_npr.config import ConfigError, load_config
    from megatron_npr.rl.config import RLConfig

    path = config_file(tiny, tmp_path / "out", tmp_path)
    assert load_config(RLConfig, path, []).rollout.placement == "colocated"  # the default
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(RLConfig, path, overrides)
