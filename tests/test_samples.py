"""Rollouts and SFT records become training samples through one function; per-token extras
(advantages, rollout log-probs) travel through packing and batching aligned with their tokens."""
from types import SimpleNamespace

import pytest
import torch

from megatron_npr.models import NPRBatch
from megatron_npr.rollout import SamplingParams
from megatron_npr.topology import TopologyError, pack
from megatron_npr.training.samples import to_sample
from npr_reference import TAGS
from test_engine import FLAT, LABEL, NESTED, PROMPT, ROUNDS, make_engine

VOCAB = SimpleNamespace(tags=TAGS, label_ids=lambda j: LABEL[j])


@pytest.fixture(scope="module")
def rollouts():
    return make_engine().generate([PROMPT, PROMPT[:3], PROMPT[1:]], SamplingParams(max_new_tokens=80, max_depth=2),
                                  replay=[FLAT, ROUNDS, NESTED])


def test_a_rollout_and_its_sft_record_give_the_same_sample(rollouts):
    for r in rollouts:
        prompt, response = r.token_ids[:r.response_start], r.token_ids[r.response_start:]
        from_rollout = to_sample(prompt, response, VOCAB, max_depth=2, forced=r.forced_mask, layout=r.layout)
        from_record = to_sample(prompt, response, VOCAB, max_depth=2)  # parsed, inserted tokens found
        assert from_rollout.token_ids.tolist() == r.token_ids
        expected = torch.tensor([False] * len(prompt) + [not f for f in r.forced_mask])
        assert torch.equal(from_rollout.loss_mask, expected) and torch.equal(from_record.loss_mask, expected)
        for name in ("position_ids", "doc_start", "hole_lo", "hole_hi"):
            assert torch.equal(getattr(from_rollout.layout, name), getattr(from_record.layout, name))


def test_extras_stay_aligned_with_their_tokens_through_pack_and_batch(rollouts):
    samples = []
    for i, r in enumerate(rollouts):
        n = len(r.token_ids) - r.response_start
        adv = torch.full((n,), float(i + 1))
        samples.append(to_sample(r.token_ids[:r.response_start], r.token_ids[r.response_start:], VOCAB, max_depth=2,
                                 forced=r.forced_mask, layout=r.layout,
                                 extras={"advantages": adv, "rollout_logprobs": torch.tensor(r.logprobs)}))
    rows = pack(samples, 80)  # several rows, documents reordered by length
    assert len(rows) >= 2
    batch = NPRBatch.from_rows(rows, length=96)
    for b, row in enumerate(rows):
        for i, lo, hi in zip(row.sample_indices, row.doc_offsets, row.doc_offsets[1:]):
            r = rollouts[i]
            r0 = lo + r.response_start
            assert torch.equal(batch.tokens[b, lo:hi], torch.tensor(r.token_ids))
            assert (batch.extras["advantages"][b, lo:r0] == 0).all()
            assert (batch.extras["advantages"][b, r0:hi] == i + 1).all()
            assert torch.equal(batch.extras["rollout_logprobs"][b, r0:hi], torch.tensor(r.logprobs))
        assert (batch.extras["advantages"][b, row.num_tokens:] == 0).all()  # padding
    # control: a sample without the field gets zeros, not its neighbour's values
    plain = to_sample(PROMPT, FLAT, VOCAB)
    mixed = pack([samples[0], plain], 200)[0]
    where = mixed.sample_indices.index(1)
    lo, hi = mixed.doc_offsets[where], mixed.doc_offsets[where + 1]
    assert (mixed.extras["advantages"][lo:hi] == 0).all() and (mixed.extras["advantages"] != 0).any()


def test_bad_inputs_are_named(rollouts):
    r = rollouts[0]
    prompt, response = r.token_ids[:r.response_start], r.token_ids[r.response_start:]
    with pytest.raises(ValueError, match="forced mask"):
        to_sample(prompt, response, VOCAB, layout=r.layout)
    with pytest.raises(ValueError, match="extra 'advantages'"):
        to_sample(prompt, response, VOCAB, forced=r.forced_mask, layout=r.layout,
                  extras={"advantages": torch.zeros(len(response) + 1)})
    with pytest.raises(ValueError, match="forced flags"):
        to_sample(prompt, response, VOCAB, forced=r.forced_mask[:-1])
    with pytest.raises(TopologyError) as e:  # the labels the engine would insert are not there
        to_sample(prompt, response, SimpleNamespace(tags=TAGS, label_ids=lambda j: [60 + j]))
    assert e.value.reason == "branch_label"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_moves_to_the_gpu_with_its_extras(rollouts):
    samples = [to_sample(r.token_ids[:r.response_start], r.token_ids[r.response_start:], VOCAB, max_depth=2,
                         forced=r.forced_mask, layout=r.layout, extras={"advantages": torch.ones(len(r.logprobs))})
               for r in rollouts]
    batch = NPRBatch.from_rows(pack(samples, 200))
    moved = batch.to("cuda")
    assert moved.tokens.is_cuda and moved.extras["advantages"].is_cuda
    assert torch.equal(moved.dense_mask().cpu(), batch.dense_mask())  # built on the GPU
