"""Packing: per-document masks and positions survive, nothing crosses documents, FFD order."""
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_npr.topology import Layout, PackingError, PackSample, build_layout, pack
from npr_reference import TAGS, dsl, prompt_and_response


def _sample(ids, response_start=0, max_depth=2):
    loss = torch.zeros(len(ids), dtype=torch.bool)
    loss[response_start:] = True
    return PackSample(torch.tensor(ids), loss, build_layout(ids, TAGS, response_start, max_depth))


def _naive_first_fit_decreasing(lengths, capacity):
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, room = [], []
    for i in order:
        for b in range(len(bins)):
            if room[b] >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@settings(max_examples=60)
@given(st.lists(prompt_and_response(max_depth=2), min_size=1, max_size=8), st.integers(0, 40))
def test_packed_rows_keep_every_document_intact(samples, slack):
    items = [_sample(ids, rs) for ids, rs in samples]
    lengths = [len(ids) for ids, _ in samples]
    max_tokens = max(lengths) + slack
    rows = pack(items, max_tokens)
    assert [list(r.sample_indices) for r in rows] == _naive_first_fit_decreasing(lengths, max_tokens)
    seen = []
    for row in rows:
        assert row.num_tokens <= max_tokens
        mask = row.layout.dense_mask()
        covered = torch.zeros_like(mask)
        for j, i in enumerate(row.sample_indices):
            a, b = row.doc_offsets[j], row.doc_offsets[j + 1]
            item = items[i]
            assert torch.equal(row.token_ids[a:b], item.token_ids)
            assert torch.equal(row.loss_mask[a:b], item.loss_mask)
            assert torch.equal(row.layout.position_ids[a:b], item.layout.position_ids)  # restart at 0
            assert torch.equal(mask[a:b, a:b], item.layout.dense_mask())
            covered[a:b, a:b] = True
            seen.append(i)
        assert not mask[~covered].any(), "attention crosses a document boundary"
    assert sorted(seen) == list(range(len(items)))


def test_overlong_samples_are_reported_never_cut(caplog):
    items = [_sample(dsl("a" * n)) for n in (5, 12, 3, 20)]
    with pytest.raises(PackingError) as err:
        pack(items, 10)
    assert err.value.overlong == [(1, 12), (3, 20)]
    assert "#1 (12 tokens)" in str(err.value) and "#3 (20 tokens)" in str(err.value)
    with caplog.at_level(logging.WARNING):
        rows = pack(items, 10, drop_overlong=True)
    assert sorted(i for r in rows for i in r.sample_indices) == [0, 2]
    assert "#3 (20 tokens)" in caplog.text


def test_bad_samples_are_named():
    good = _sample(dsl("a a a"))
    with pytest.raises(PackingError, match="sample 1"):
        pack([good, (torch.tensor([1, 2]), torch.ones(3, dtype=torch.bool), good.layout)], 10)
    with pytest.raises(ValueError, match="max_tokens"):
        pack([good], 0)


def test_pad_to_adds_an_isolated_document_without_loss():
    row = pack([_sample(dsl("a G P a p P a p g S a s S a s K a k a"), 1)], 32)[0]
    padded = row.pad_to(32, pad_id=0)
    assert padded.num_tokens == 32 and padded.sample_indices == (0, -1)
    assert padded.doc_offsets == (0, row.num_tokens, 32)
    assert not padded.loss_mask[row.num_tokens:].any()
    mask = padded.layout.dense_mask()
    n = row.num_tokens
    assert torch.equal(mask[:n, :n], row.layout.dense_mask())
    assert torch.equal(mask[n:, n:], Layout.causal(32 - n).dense_mask())
    assert not mask[n:, :n].any()
    assert padded.layout.position_ids[n:].tolist() == list(range(32 - n))
    with pytest.raises(ValueError):
        padded.pad_to(10, 0)
