"""Engines on their own ranks (megatron_npr.rollout.group.EngineGroup), spawned from this process:
requests spread over engines come back in prompt order and equal one engine's; weights reach every
engine bitwise over the weight group; an engine that dies, hangs, raises or never starts is named
and the call fails within its timeout instead of hanging."""
import functools
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
import group_engines  # noqa: E402
from group_engines import PROMPTS, tiny_engine  # noqa: E402

from megatron_npr.rollout import SamplingParams  # noqa: E402
from megatron_npr.rollout.group import EngineGroup, EngineGroupError, contiguous_shares  # noqa: E402

PARAMS = SamplingParams(n=2, max_new_tokens=24, seed=4)
SEEDS = [11, 12, 13, 14, 15, 16]


@pytest.fixture(scope="module")
def default_group():
    """The size-1 default group the group helper needs (what `npr rl` always has)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_engines(default_group):
    group = EngineGroup.start(tiny_engine, engines=2, timeout_s=60)
    yield group
    group.close()


def same_rollouts(a, b, tol=1e-5) -> bool:
    return len(a) == len(b) and all(
        x.token_ids == y.token_ids and x.forced_mask == y.forced_mask and x.finish_reason == y.finish_reason
        and max((abs(u - v) for u, v in zip(x.logprobs, y.logprobs)), default=0.0) <= tol for x, y in zip(a, b))


def test_shares_are_contiguous_and_cover_every_prompt():
    assert [list(r) for r in contiguous_shares(5, 2)] == [[0, 1], [2, 3, 4]]
    assert [len(r) for r in contiguous_shares(2, 3)] == [0, 1, 1]
    assert sum(len(r) for r in contiguous_shares(37, 8)) == 37


def test_two_engines_return_one_engines_rollouts_in_prompt_order(two_engines):
    """Per-prompt seeds: the same rollouts whatever the number of engines (token ids exactly,
    log-probs within 1e-5: a batch of other size rounds differently)."""
    local = tiny_engine()
    reference = local.generate(PROMPTS, PARAMS, seeds=SEEDS)
    spread = two_engines.generate(PROMPTS, PARAMS, seeds=SEEDS)
    assert same_rollouts(reference, spread)
    assert len({tuple(r.token_ids) for r in spread}) == len(spread)  # the check has something to compare
    # negative control: the same shares in the wrong order are caught
    assert not same_rollouts(reference, spread[PARAMS.n * 3:] + spread[:PARAMS.n * 3])
    # without per-prompt seeds an engine's samples depend on the prompt's index in its share
    second_half = local.generate(PROMPTS[3:], PARAMS)
    assert not same_rollouts(local.generate(PROMPTS, PARAMS)[PARAMS.n * 3:], second_half)


@pytest.mark.parametrize("flattened", [True, False])
def test_weights_reach_every_engine_bitwise(two_engines, flattened):
    """A weight update session over the group: each engine holds exactly the sent tensors, and its
    rollouts are then the local engine's on the same weights."""
    new = [(n, t.detach().clone()) for n, t in group_engines.model(seed=flattened + 5).state_dict().items()]
    local = tiny_engine()
    local.update_weights(new)
    two_engines.flattened = flattened
    two_engines.begin_weight_update()
    half = len(new) // 2
    assert two_engines.update_weights(new[:half]) + two_engines.update_weights(new[half:]) == len(new)
    two_engines.end_weight_update(1)
    digests = two_engines._all("weight_digest", ())
    assert digests[0] == digests[1] == local.weight_digest()
    assert same_rollouts(local.generate(PROMPTS, PARAMS, seeds=SEEDS), two_engines.generate(PROMPTS, PARAMS,
                                                                                              seeds=SEEDS))
    assert digests[0] != tiny_engine().weight_digest()  # negative control: the old weights differ


@pytest.mark.parametrize("flattened", [True, False])
def test_one_sender_drives_a_torch_engine_and_an_sglang_engine(default_group, tmp_path, flattened):
    """Engine rank 1 is the torch engine, rank 2 SGLangBackend over the fake SGLang engine (which
    receives as SGLang's scheduler does, research note 2b): both hold the sent tensors bitwise."""
    group_engines.model(seed=0).save_pretrained(tmp_path)
    group = EngineGroup.start(functools.partial(group_engines.mixed_engines, str(tmp_path)), engines=2, timeout_s=60,
                              flattened=flattened)
    try:
        new = [(n, t.detach().clone()) for n, t in group_engines.model(seed=9).state_dict().items()]
        group.begin_weight_update()
        assert group.update_weights(new) == len(new)
        group.end_weight_update(3)
        torch_side, sglang_side = group._all("weight_digest", ())
        assert group.engines[1]["backend"] == "DigestSGLang"
        assert torch_side == sglang_side == group_engines.digest(dict(new))
    finally:
        group.close()


def test_memory_hooks_and_errors_come_back_named(two_engines):
    two_engines.release_memory()
    two_engines.resume_memory(["weights"])
    two_engines.resume_memory(None)
    with pytest.raises(EngineGroupError, match=r"(?s)engine rank 1 .*failed in 'update_weights'.*"
                                                r"engine rank 2 .*model.layers.0.bogus"):
        two_engines._all("update_weights", ([("model.layers.0.bogus", torch.zeros(2))],))
    assert len(two_engines.generate(PROMPTS[:1], PARAMS, seeds=SEEDS[:1])) == PARAMS.n  # still in step


@pytest.mark.parametrize("factory, timeout, expect", [
    ("dying_engine", 60, r"engine rank 1 .*did not answer 'generate'.*exited with code 3"),
    ("hanging_engine", 3, r"engine rank 1 .*did not answer 'generate' within 3 s"),
    ("raising_engine", 60, r"(?s)engine rank 1 .*failed in 'generate'.*prompt 3 is too long"),
])
def test_a_failing_engine_is_named_within_its_timeout(default_group, factory, timeout, expect):
    group = EngineGroup.start(getattr(group_engines, factory), engines=1, timeout_s=60, generate_timeout_s=timeout)
    started = time.monotonic()
    try:
        with pytest.raises(EngineGroupError, match=expect):
            group.generate(PROMPTS[:2], PARAMS, seeds=SEEDS[:2])
        assert time.monotonic() - started < timeout + 20
    finally:
        for p in group.processes:
            p.kill()


def test_an_engine_that_loads_less_than_it_was_sent_is_named(default_group):
    group = EngineGroup.start(group_engines.ignoring_engine, engines=1, timeout_s=60)
    try:
        group.begin_weight_update()
        with pytest.raises(EngineGroupError, match=r"engine rank 1 .* loaded 0 of \d+ tensors"):
            group.update_weights(list(group_engines.model(seed=3).state_dict().items()))
    finally:
        group.close()


def test_an_engine_that_never_starts_is_named_at_once(default_group, capfd):
    started = time.monotonic()
    with pytest.raises(EngineGroupError, match=r"npr-engine-2 exited with code 1 before joining"):
        EngineGroup.start(functools.partial(_one_fails, 2), engines=2, timeout_s=120)
    assert time.monotonic() - started < 60  # not the 120 s rendezvous timeout
    assert "CUDA out of memory while loading the engine" in capfd.readouterr().err


def _one_fails(rank: int):
    import multiprocessing
    if multiprocessing.current_process().name == f"npr-engine-{rank}":
        return group_engines.never_starts()
    return tiny_engine()
