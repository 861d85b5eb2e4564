"""PackedLoader: deterministic, resumable, DP-sharded packed-row steps."""
import json
import math

import pytest
import torch
from npr_reference import TAG_BASE, TAGS, dsl

from megatron_npr.topology import PackingError, PackSample, build_layout
from megatron_npr.training.loader import PackedLoader

SHAPES = ["aa G P a p P a p g S a a s S a s K a k a", "a G P a p g S a a a s K a a k", "aaaa aaa"]


def make_samples(n=40, seed=0, response_start=1):
    """n NPR documents of varied length (random text tokens, a valid structure each)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)] + " a" * int(torch.randint(0, 30, (1,), generator=g))
        ids = dsl(shape)
        tokens = torch.tensor([t if t >= TAG_BASE else int(torch.randint(1, TAG_BASE, (1,), generator=g))
                               for t in ids])
        out.append(PackSample(tokens, torch.arange(len(ids)) >= response_start,
                              build_layout(ids, TAGS, response_start)))
    return out


def fingerprint_of(step):
    """What identifies a step: its rows' tokens and loss masks."""
    return [(b.tokens.tolist(), b.loss_mask.tolist()) for b in step.microbatches]


def rows_of(loader, steps):
    return [loader.next_step().row_indices for _ in range(steps)]


@pytest.fixture(scope="module")
def samples():
    return make_samples()


def test_two_instances_serve_the_same_steps(samples):
    a, b = PackedLoader(samples, 64, 4, seed=3), PackedLoader(samples, 64, 4, seed=3)
    for _ in range(a.rows_per_epoch):  # several epochs
        x, y = a.next_step(), b.next_step()
        assert fingerprint_of(x) == fingerprint_of(y) and x.row_indices == y.row_indices
    other = PackedLoader(samples, 64, 4, seed=4)  # negative control: another seed, another order
    assert rows_of(other, 3) != rows_of(PackedLoader(samples, 64, 4, seed=3), 3)


def test_each_epoch_is_every_row_once_in_a_fresh_order(samples):
    loader = PackedLoader(samples, 64, 1, seed=0)
    n = loader.rows_per_epoch
    epochs = [[loader.next_step().row_indices[0] for _ in range(n)] for _ in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert loader.next_step().epoch == 3


def test_step_contents_and_totals(samples):
    loader = PackedLoader(samples, 64, 4, micro_rows=2, pad_id=7)
    step = loader.next_step()
    assert len(step.microbatches) == 2 and step.step == 0 and step.epoch == 0
    assert all(b.tokens.shape == (2, 64) for b in step.microbatches)
    rows = [loader.rows[i] for i in step.row_indices]
    assert step.real_tokens == sum(r.num_tokens for r in rows) and step.capacity == 4 * 64
    assert step.global_loss_tokens == sum(int(b.targets()[1].sum()) for b in step.microbatches)
    first = step.microbatches[0]
    assert first.tokens[0, rows[0].num_tokens:].eq(7).all()  # padding
    # independently: trained tokens that have a predecessor in their own document
    per_doc = sum(int(r.loss_mask[a + 1:b].sum()) for r in rows for a, b in zip(r.doc_offsets, r.doc_offsets[1:]))
    assert step.global_loss_tokens == per_doc
    everything = [PackSample(x.token_ids, torch.ones_like(x.loss_mask), x.layout) for x in samples]
    all_step = PackedLoader(everything, 64, 4, micro_rows=2).next_step()  # control: every token trained
    docs = sum(len(loader.rows[i].sample_indices) for i in all_step.row_indices)
    assert all_step.global_loss_tokens == all_step.real_tokens - docs


@pytest.mark.parametrize("dp,micro", [(2, 1), (4, 1), (2, 2)])
def test_dp_ranks_are_disjoint_and_cover_the_step(samples, dp, micro):
    rows_per_step = 8
    whole = PackedLoader(samples, 64, rows_per_step, seed=1)
    ranks = [PackedLoader(samples, 64, rows_per_step, dp_rank=r, dp_size=dp, micro_rows=micro, seed=1)
             for r in range(dp)]
    for _ in range(5):
        ref = whole.next_step()
        parts = [rk.next_step() for rk in ranks]
        assert [i for p in parts for i in p.row_indices] == list(ref.row_indices)  # cover, in rank order
        assert all(len(p.row_indices) == rows_per_step // dp for p in parts)  # each exactly its share
        assert all(len(p.microbatches) == rows_per_step // dp // micro for p in parts)
        assert {p.global_loss_tokens for p in parts} == {ref.global_loss_tokens}
        assert {p.real_tokens for p in parts} == {ref.real_tokens}
        local = sum(int(b.targets()[1].sum()) for p in parts for b in p.microbatches)
        assert local == ref.global_loss_tokens
    # negative control: ranks with different seeds would not cover the reference step
    stray = PackedLoader(samples, 64, rows_per_step, dp_rank=1, dp_size=2, seed=2).next_step()
    first = PackedLoader(samples, 64, rows_per_step, dp_rank=0, dp_size=2, seed=1).next_step()
    assert list(first.row_indices + stray.row_indices) != list(PackedLoader(samples, 64, rows_per_step,
                                                                           seed=1).next_step().row_indices)


@pytest.mark.parametrize("stop_at", [1, 5, 7, 13])  # mid-epoch and around epoch boundaries
def test_resume_reproduces_the_uninterrupted_run(samples, stop_at):
    run = PackedLoader(samples, 64, 3, dp_rank=1, dp_size=3, seed=9)
    assert run.rows_per_epoch % 3  # steps straddle epoch boundaries
    reference = [fingerprint_of(run.next_step()) for _ in range(stop_at + 6)]
    first = PackedLoader(samples, 64, 3, dp_rank=1, dp_size=3, seed=9)
    for _ in range(stop_at):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = PackedLoader(samples, 64, 3, dp_rank=1, dp_size=3, seed=9)
    resumed.load_state_dict(state)
    after = [resumed.next_step() for _ in range(6)]
    assert [fingerprint_of(s) for s in after] == reference[stop_at:]
    assert after[0].step == stop_at
    fresh = PackedLoader(samples, 64, 3, dp_rank=1, dp_size=3, seed=9)  # negative control: no resume
    assert fingerprint_of(fresh.next_step()) != reference[stop_at]


def test_resume_on_other_data_is_refused(samples):
    state = PackedLoader(samples, 64, 2, seed=0).state_dict()
    assert set(state) >= {"step", "seed", "fingerprint"}
    PackedLoader(samples, 64, 2, seed=0).load_state_dict(state)  # control: same data loads
    for other in (PackedLoader(samples[:-1], 64, 2, seed=0), PackedLoader(samples, 96, 2, seed=0),
                  PackedLoader(make_samples(seed=1), 64, 2, seed=0), PackedLoader(samples, 64, 2, seed=5),
                  PackedLoader(samples, 64, 4, seed=0)):
        with pytest.raises(ValueError, match="saved loader served other rows"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a loader state"):
        PackedLoader(samples, 64, 2).load_state_dict({"step": 3})


def test_argument_errors(samples):
    with pytest.raises(ValueError, match="not a multiple of dp_size\\*micro_rows = 2\\*2"):
        PackedLoader(samples, 64, 6, dp_size=2, micro_rows=2)
    PackedLoader(samples, 64, 8, dp_size=2, micro_rows=2)  # control: divisible
    with pytest.raises(ValueError, match="dp_rank"):
        PackedLoader(samples, 64, 2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="no samples"):
        PackedLoader([], 64, 2)
    too_long = r"33 sample\(s\) longer than max_tokens=16 .*sample #0: 35 tokens.* and 23 more"
    with pytest.raises(PackingError, match=too_long):
        PackedLoader(samples, 16, 1)


def test_overlong_error_names_the_source_line(samples):
    from megatron_npr.training.sft_data import SFTSample
    s = samples[0]
    tagged = [SFTSample(s.token_ids, s.loss_mask, s.layout, line=17)]
    with pytest.raises(PackingError, match="sample #0 \\(line 17\\)"):
        PackedLoader(tagged, 8, 1)


def test_sizes(samples):
    loader = PackedLoader(samples, 64, 4)
    total = sum(s.token_ids.numel() for s in samples)
    assert loader.rows_per_epoch == len(loader.rows) >= math.ceil(total / 64)
    assert loader.packing_efficiency == pytest.approx(total / (loader.rows_per_epoch * 64))
    assert loader.steps_for_epochs(1) == math.ceil(loader.rows_per_epoch / 4)
    assert loader.steps_for_epochs(0.5) == math.ceil(loader.rows_per_epoch / 8)
    assert PackedLoader(samples, 64, 1).steps_for_epochs(2.0) == 2 * loader.rows_per_epoch
    with pytest.raises(ValueError, match="epochs"):
        loader.steps_for_epochs(0)
