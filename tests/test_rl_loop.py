"""`npr rl`: the RL loop of DAPO and PAPO on a tiny random Qwen3 over the real tokenizer.

- fidelity: the real engine's log-probs of sampled tokens equal the real trainer's (fp32) at every
  step, across several weight syncs, sequential (DAPO) and parallel (PAPO) and at TP2; skipping
  one sync breaks it;
- a run killed at each phase (generate, train, sync, save) resumes to the uninterrupted run's
  metrics with no duplicate rows;
- the ends of the loop: dynamic sampling that finds nothing informative, PAPO with every
  rollout invalid, problems without an answer, rollout dumps, bad config keys.
Rewards come from `workers/rl_scripted.py` (the real engine replaying a correct and a wrong
solution in every group) where a random model alone would make them trivial."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from harness import run_in_session  # noqa: E402
from rl_scripted import plain_engine, rl_config, scripted_engine, write_tiny_setup  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "rl_scripted.py"
NOT_REPRODUCIBLE = ("time_", "step_time_s", "_per_s", "sync_time_s")  # wall-clock metrics


class Killed(Exception):
    """A simulated kill at a crash point (the process-level kill is in the TP2 test)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen, megatron):
    return write_tiny_setup(tmp_path_factory.mktemp("rl"), qwen[0])




def _load(cfg: dict, tmp: Path, *overrides: str):
    from megatron_npr.config import load_config
    from megatron_npr.rl.config import RLConfig
    path = tmp / f"cfg_{abs(hash((json.dumps(cfg), overrides))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(RLConfig, path, list(overrides)), path


def run(cfg: dict, tmp: Path, vocab, *, crash: str | None = None, skip_sync: int | None = None, scripted: bool = True,
        monkeypatch=None) -> dict:
    """run_rl in this process with the scripted engine (or the plain one); `crash="phase:step"`
    raises Killed at that crash point. `vocab` is the session's (loading one takes seconds)."""
    from megatron_npr.rl import loop

    config, _ = _load(cfg, tmp)
    if crash and monkeypatch:
        def crash_point(point, step):
            if f"{point}:{step}" == crash:
                raise Killed(crash)
        monkeypatch.setattr(loop, "crash_point", crash_point)
    engine = scripted_engine(config, vocab, skip_sync) if scripted else plain_engine(config, vocab)
    try:
        return loop.run_rl(config, progress=False, engine=engine, vocab=vocab)
    finally:
        if monkeypatch:
            monkeypatch.undo()


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def reproducible(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(part in k for part in NOT_REPRODUCIBLE)}


@pytest.fixture(scope="module")
def dapo_run(tiny, vocab, tmp_path_factory):
    """An uninterrupted 3-step DAPO run, checkpointing at step 2 and at the end."""
    out = tmp_path_factory.mktemp("dapo") / "run"
    summary = run(rl_config(*tiny, out, "dapo", save_every=2), out.parent, vocab)
    return out, metrics(out), summary


def test_dapo_engine_equals_trainer_at_every_step(dapo_run):
    out, rows, summary = dapo_run
    assert [r["step"] for r in rows] == [1, 2, 3] and summary["skipped_steps"] == 0
    assert [r["weight_version"] for r in rows] == [0, 1, 2] and summary["weight_version"] == 3  # a sync per step
    for r in rows:
        assert r["trained_rollouts"] > 0 and r["mismatch_tokens"] > 100, r
        assert r["mismatch_max"] <= 1e-5, r  # sequential decode, causal training: every sampled token
    assert rows[0]["reward_std"] > 0 and rows[0]["grad_norm"] > 0
    assert (out / "curves.png").is_file() and (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert json.loads((out / "summary.json").read_text())["max_mismatch"] == summary["max_mismatch"]


def test_papo_engine_equals_trainer_over_branches_and_a_skipped_sync_breaks_it(tiny, vocab, tmp_path):
    good = run(rl_config(*tiny, tmp_path / "papo", "papo"), tmp_path, vocab)
    rows = metrics(tmp_path / "papo")
    assert good["skipped_steps"] == 0 and [r["weight_version"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["parallel_trigger_rate"] > 0 and r["dropped_rollouts"] > 0, r  # free samples are dropped
        assert r["mismatch_max"] <= 1e-5 and r["mismatch_max_branch"] > 0, r  # branch tokens compared
    # the engine ignores its 2nd weight update (the sync after step 1): step 2 samples stale weights
    run(rl_config(*tiny, tmp_path / "stale", "papo", steps=2), tmp_path, vocab, skip_sync=2)
    stale = metrics(tmp_path / "stale")
    assert stale[0]["mismatch_max"] <= 1e-5 and stale[1]["mismatch_max"] > 1e-3, stale[1]["mismatch_max"]


def test_killed_run_resumes_to_the_same_metrics_at_every_phase(tiny, vocab, dapo_run, tmp_path, monkeypatch):
    """One run directory killed at step 3 in each phase in turn (each restart resumes from the
    step-2 checkpoint; the save kill leaves step 3's metrics line behind), then run to the end."""
    _, reference, _ = dapo_run
    cfg = rl_config(*tiny, tmp_path / "run", "dapo", save_every=2)
    for phase in ("generate", "train", "sync", "save"):
        with pytest.raises(Killed):
            run(cfg, tmp_path, vocab, crash=f"{phase}:3", monkeypatch=monkeypatch)
        assert [r["step"] for r in metrics(tmp_path / "run")] == ([1, 2, 3] if phase == "save" else [1, 2])
    run(cfg, tmp_path, vocab)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]  # no duplicate line
    for got, want in zip(rows, reference):
        got, want = reproducible(got), reproducible(want)
        assert got.keys() == want.keys()
        bad = {k: (got[k], want[k]) for k in got if abs(float(got[k]) - float(want[k])) > 1e-6}
        assert not bad, bad
    dumps = sorted(p.name for p in (tmp_path / "run" / "rollouts").iterdir())
    assert dumps == ["step_00001.jsonl", "step_00002.jsonl", "step_00003.jsonl"]


def test_rollout_dump_gives_back_the_advantages(tiny, dapo_run, vocab):
    """Each dumped line has what a reader needs: the advantages follow from the dumped rewards."""
    out, rows, _ = dapo_run
    questions = {r["id"]: r["question"] for r in map(json.loads, Path(tiny[1]).read_text().splitlines())}
    dump = [json.loads(line) for line in (out / "rollouts" / "step_00002.jsonl").read_text().splitlines()]
    assert len(dump) == rows[1]["rollouts"] and all(d["weight_version"] == 1 for d in dump)
    groups = {}
    for d in dump:
        groups.setdefault(d["group"], []).append(d)
        assert d["token_ids"][:d["response_start"]] == vocab.prompt_ids(questions[d["problem_id"]], "")
    for members in groups.values():
        rewards = [d["reward"] for d in members]
        mean = sum(rewards) / len(rewards)
        std = (sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1)) ** 0.5  # unbiased, over the group
        for d in members:
            expected = (d["reward"] - mean) / (std + 1e-6) if d["trained"] else 0.0
            assert d["advantage"] == pytest.approx(expected, abs=1e-9)
    assert any(d["trained"] for d in dump) and any(d["format_reason"] for d in dump)


def test_dynamic_sampling_gives_up_and_skips_the_step(tiny, vocab, tmp_path):
    """Greedy decoding makes the n samples of a group identical: no group is ever informative.
    The step draws max_generation_rounds batches, is skipped and counted, and the run ends
    A record without an answer is skipped and named."""
    data = tmp_path / "problems.jsonl"
    data.write_text(Path(tiny[1]).read_text() + json.dumps({"question": "What is 1 + 1?"}) + "\n")
    cfg = rl_config(tiny[0], data, tmp_path / "out", "dapo", steps=2, max_generation_rounds=2)
    cfg["sampling"] |= {"temperature": 0.0, "max_new_tokens": 8}
    summary = run(cfg, tmp_path, vocab, scripted=False)
    rows = metrics(tmp_path / "out")
    assert [r["step_skipped"] for r in rows] == [1, 1] and [r["generation_rounds"] for r in rows] == [2, 2]
    assert all(r["groups_uninformative"] == 4 and r["rollouts"] == 12 and r["updates"] == 0 for r in rows)
    assert summary["skipped_steps"] == 2 and summary["weight_version"] == 0
    assert summary["skipped_problems"] == ["record 6: missing 'answer' (or 'final_answer')"]


def test_papo_with_every_rollout_invalid_skips_the_step(tiny, vocab, tmp_path):
    """The random model alone never writes a valid parallel structure: every rollout is dropped
    (counted by reason) and the step is skipped."""
    cfg = rl_config(*tiny, tmp_path / "out", "papo", steps=1)
    cfg["sampling"]["max_new_tokens"] = 12
    summary = run(cfg, tmp_path, vocab, scripted=False)
    (row,) = metrics(tmp_path / "out")
    assert row["dropped_rollouts"] == row["rollouts"] == 6 and row["dropped_length"] + row.get(
        "dropped_missing_block", 0) == 6
    assert row["step_skipped"] == 1 and row["trained_rollouts"] == 0 and summary["skipped_steps"] == 1


def test_missing_answers_error_and_bad_keys_exit_2(tiny, tmp_path, capsys):
    from megatron_npr.cli import main

    data = tmp_path / "problems.jsonl"
    data.write_text(Path(tiny[1]).read_text() + json.dumps({"question": "What is 1 + 1?"}) + "\n")
    _, path = _load(rl_config(tiny[0], data, tmp_path / "out", missing_answer="error"), tmp_path)
    assert main(["rl", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "1 problem(s) without a gold answer (record 6)" in err and "rl.missing_answer" in err, err
    assert main(["rl", str(path), "rl.stepz=3"]) == 2
    assert "unknown key 'rl.stepz'" in capsys.readouterr().err
    assert main(["rl", str(path), "rl.steps=0"]) == 2
    assert "rl.steps=0" in capsys.readouterr().err
    # an export folder that is already there is refused before any training, not after it
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_text("a model from another run")
    assert main(["rl", str(path), f"rl.export_hf={tmp_path / 'export'}"]) == 2
    assert f"rl.export_hf={tmp_path / 'export'} already exists" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_batches_split_over_dp_ranks_and_recomputed_old_logprobs_line_up(tiny, vocab, tmp_path):
    """build_batch gives every DP rank the same number of equally long microbatches and each
    rollout to one rank; the trainer's log-probs land on the engine's per token (the old
    log-probs of a multi-update loss are the engine's, within fp32 noise, before any update)."""
    from megatron_npr.rl.batch import build_batch, with_old_logprobs
    from megatron_npr.rollout import SamplingParams, logprob_mismatch
    from megatron_npr.training.trainer import MegatronTrainer

    config, _ = _load(rl_config(*tiny, tmp_path / "out", "papo"), tmp_path)
    questions = [json.loads(line)["question"] for line in Path(tiny[1]).read_text().splitlines()][:3]
    rollouts = scripted_engine(config, vocab).generate([vocab.prompt_ids(q, "") for q in questions],
                                                       SamplingParams(n=2, max_new_tokens=80), seeds=[1, 2, 3])
    assert all(r.layout is not None and any(r.forced_mask) for r in rollouts)  # parallel, with inserted tokens
    advantages = [0.5, -0.5] * 3
    shares = [build_batch(rollouts, advantages, vocab, max_tokens=160, micro_rows=1, dp_rank=r, dp_size=2)
              for r in range(2)]
    assert len(shares[0].rows) % 2 == 0 and len(shares[0].microbatches) == len(shares[1].microbatches)
    owned = sorted(i for share in shares for k in share.mine for i in share.rows[k].sample_indices if i >= 0)
    assert owned == list(range(6)) and len({mb.tokens.shape for sh in shares for mb in sh.microbatches}) == 1

    trainer = MegatronTrainer.build(config.model, config.parallel, config.optim, 1, 0, tmp_path / "ckpt")
    whole = build_batch(rollouts, advantages, vocab, max_tokens=160, micro_rows=2, dp_rank=0, dp_size=1)
    lp = trainer.logprobs(whole.microbatches)
    per_rollout = whole.response_logprobs(lp)
    assert max(logprob_mismatch(rollouts[i], v).max().item() for i, v in per_rollout.items()) <= 1e-5
    for mb, old in zip(whole.microbatches, with_old_logprobs(whole.microbatches, lp)):
        trained = mb.loss_mask  # sampled response tokens: their engine and trainer log-probs agree
        engine, trainer_old = mb.extras["old_logprobs"][trained], old.extras["old_logprobs"][trained]
        assert trained.sum() > 100 and (engine - trainer_old).abs().max() <= 1e-5
        assert torch.equal(old.extras["advantages"], mb.extras["advantages"])


def test_several_updates_per_batch(tiny, vocab, tmp_path):
    """DAPO with 2 updates per batch: two optimizer steps on mini-batches of whole groups, the
    clipped loss, one weight version per step, and the engine still equals the trainer."""
    run(rl_config(*tiny, tmp_path / "out", "dapo", steps=2, updates_per_batch=2), tmp_path, vocab)
    rows = metrics(tmp_path / "out")
    assert [r["updates"] for r in rows] == [2, 2] and [r["weight_version"] for r in rows] == [0, 1]
    assert all(r["mismatch_max"] <= 1e-5 and "clip_fraction" in r for r in rows)


def test_prompt_stream_resumes_and_covers_every_problem():
    from megatron_npr.rl.prompts import PromptStream

    stream = PromptStream(list(range(5)), 2, seed=3)
    first = stream.take() + stream.take() + stream.take()
    assert sorted(first[:5]) == list(range(5))  # an epoch is every problem once
    resumed = PromptStream(list(range(5)), 2, seed=3)
    resumed.load_state_dict(stream.state_dict())
    assert resumed.take(7) == stream.take(7)
    assert PromptStream(list(range(5)), 2, seed=4).take(5) != first[:5]
    with pytest.raises(ValueError, match="seed 3"):
        PromptStream(list(range(6)), 2, seed=3).load_state_dict(stream.state_dict())


@pytest.mark.multirank
def test_tp2_killed_during_sync_resumes_with_the_trainers_weights(tiny, tmp_path):
    """TP2 (one torchrun): both ranks killed at step 2's sync, then restarted. The restarted engine
    starts from the resumed trainer's weights, so every step's mismatch stays <= 1e-5, and the
    metrics file has each step once."""
    from megatron_npr.distributed import free_port

    _, path = _load(rl_config(*tiny, tmp_path / "out", "papo", save_every=1), tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for crash in ("sync:2", None):
        env.pop("NPR_TEST_CRASH", None)
        env |= {"NPR_TEST_CRASH": crash} if crash else {}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(WORKER), str(path), "parallel.tp=2"]
        log = tmp_path / f"run_{crash is None}.log"
        code = run_in_session(cmd, log, env)
        assert (code != 0) == bool(crash), log.read_text()[-6000:]
        assert not crash or "exitcode  : 17" in log.read_text(), log.read_text()[-3000:]
    rows = metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["weight_version"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["mismatch_max"] <= 1e-5 and r["mismatch_max_branch"] > 0 and r["trained_rollouts"] > 0, r
    assert torch.tensor([r["grad_norm"] for r in rows]).gt(0).all()
