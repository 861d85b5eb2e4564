"""The slot-addressed pure-torch Qwen3 forward against HF transformers on NPR layouts (CPU, fp32)."""
from __future__ import annotations

import pytest
import torch

from megatron_npr.rollout import qwen3_torch
from megatron_npr.rollout.qwen3_torch import KVCache, Qwen3Spec, Qwen3Weights, forward
from megatron_npr.topology import build_layout
from model_fixtures import TRAJECTORIES, additive_mask, tiny_hf_model
from npr_reference import TAGS, dsl

ATOL = 1e-5
JUNK = 10**9  # padding entries of `visible` may hold any value, even out of range


def trajectory(index: int, seed: int = 0):
    """(tokens [L], positions [L], mask bool [L, L]) of one trajectory, text ids random < 100."""
    text, response_start = TRAJECTORIES[index]
    ids = dsl(text)
    g = torch.Generator().manual_seed(seed + index)
    tokens = torch.tensor([t if t >= 100 else int(torch.randint(0, 100, (1,), generator=g)) for t in ids])
    layout = build_layout(ids, TAGS, response_start, max_depth=2)
    return tokens, layout.position_ids.clone(), layout.dense_mask()


def visible_rows(mask: torch.Tensor, slot_of: torch.Tensor):
    """visible [n, V] (slots of each row's True columns, JUNK-padded) and visible_len [n]."""
    lengths = mask.sum(1)
    visible = torch.full((mask.shape[0], int(lengths.max())), JUNK, dtype=torch.long)
    for i, row in enumerate(mask):  # test-side construction only; forward itself has no token loop
        cols = row.nonzero().squeeze(1)
        visible[i, :len(cols)] = slot_of[cols]
    return visible, lengths


def spec_of(model) -> Qwen3Spec:
    return Qwen3Spec.from_hf_config(model.config.to_dict())


def weights_of(model) -> Qwen3Weights:
    return Qwen3Weights(spec_of(model), model.state_dict())


def hf_logits(model, tokens, positions, mask):
    with torch.no_grad():
        return model(input_ids=tokens[None], attention_mask=additive_mask(mask),
                     position_ids=positions[None]).logits[0]


def one_shot(weights, tokens, positions, mask, slot_of=None, num_slots=None):
    L = len(tokens)
    slot_of = torch.arange(L) if slot_of is None else slot_of
    cache = KVCache(weights.spec, num_slots or L)
    visible, visible_len = visible_rows(mask, slot_of)
    return forward(weights, cache, tokens, positions, slot_of, visible, visible_len)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request):
    return tiny_hf_model(tied=request.param)


@pytest.mark.parametrize("index", range(len(TRAJECTORIES)))
def test_whole_sequence_matches_hf(model, index):
    tokens, positions, mask = trajectory(index)
    ours = one_shot(weights_of(model), tokens, positions, mask)
    assert ours.dtype == torch.float32 and ours.shape == (len(tokens), model.config.vocab_size)
    torch.testing.assert_close(ours, hf_logits(model, tokens, positions, mask), atol=ATOL, rtol=0)


def test_query_chunking_is_exact(model, monkeypatch):
    """A tiny gather budget forces many query chunks; results must not change."""
    tokens, positions, mask = trajectory(2)
    weights = weights_of(model)
    reference = one_shot(weights, tokens, positions, mask)
    monkeypatch.setattr(qwen3_torch, "GATHER_BUDGET", 1)  # -> one query per chunk
    torch.testing.assert_close(one_shot(weights, tokens, positions, mask), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("permuted", [False, True], ids=["identity-slots", "permuted-slots"])
@pytest.mark.parametrize("index", [1, 2])  # two rounds; nested branches
def test_incremental_decoding_equals_one_shot(model, index, permuted):
    tokens, positions, mask = trajectory(index)
    L = len(tokens)
    weights = weights_of(model)
    reference = one_shot(weights, tokens, positions, mask)
    # Permuted: token t lives at slot_of[t] of a cache twice as large (unused slots stay zero).
    num_slots = 2 * L if permuted else L
    slot_of = torch.randperm(num_slots, generator=torch.Generator().manual_seed(index))[:L] \
        if permuted else torch.arange(L)
    cache = KVCache(weights.spec, num_slots)
    bounds = [0, 1, 6] + list(range(7, L + 1))  # a 1-token prompt, a 5-token chunk, then one by one
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        # Each chunk only ever sees keys up to itself (the NPR mask is causal), written now or before.
        visible, visible_len = visible_rows(mask[lo:hi], slot_of)
        pieces.append(forward(weights, cache, tokens[lo:hi], positions[lo:hi], slot_of[lo:hi],
                              visible, visible_len))
    torch.testing.assert_close(torch.cat(pieces), reference, atol=ATOL, rtol=0)


def branch_spans(tokens):
    """[(start, end)] of each `<step> ... </step>` at the outermost level."""
    step_open, step_close = TAGS.ids[4], TAGS.ids[5]
    spans, depth, start = [], 0, None
    for i, t in enumerate(tokens.tolist()):
        if t == step_open:
            depth += 1
            if depth == 1:
                start = i
        elif t == step_close:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def test_negative_controls_positions_and_mask_matter(model):
    """The parity tests are sensitive: a branch off by one position, or a branch that can see its
    earlier sibling, changes the logits well beyond the tolerance."""
    tokens, positions, mask = trajectory(0)
    weights = weights_of(model)
    reference = one_shot(weights, tokens, positions, mask)
    (_, _), (lo, hi) = branch_spans(tokens)[:2]

    shifted = positions.clone()
    shifted[lo:hi] += 1
    moved = one_shot(weights, tokens, shifted, mask)
    assert (moved - reference)[lo:hi].abs().max() > 1e-3

    leaky = mask.clone()
    leaky[lo:hi, :lo] = torch.tril(torch.ones(hi, lo, dtype=torch.bool))[lo:hi]  # sees all earlier tokens
    assert not torch.equal(leaky, mask)
    assert (one_shot(weights, tokens, positions, leaky) - reference)[lo:hi].abs().max() > 1e-3


def test_update_loads_another_models_weights(model):
    tied = model.config.tie_word_embeddings
    other = tiny_hf_model(tied=tied, seed=7)
    tokens, positions, mask = trajectory(1)
    weights = weights_of(model)
    before = one_shot(weights, tokens, positions, mask)
    state = other.state_dict()
    assert weights.update(state.items()) == len(state)  # a tied state dict lists lm_head too
    after = one_shot(weights, tokens, positions, mask)
    torch.testing.assert_close(after, hf_logits(other, tokens, positions, mask), atol=ATOL, rtol=0)
    assert (after - before).abs().max() > 1e-3


def test_update_and_init_reject_bad_tensors(model):
    weights = weights_of(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.bogus\.weight"):
        weights.update([("model.layers.0.self_attn.bogus.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        weights.update([("model.layers.1.mlp.up_proj.weight", torch.zeros(128, 63))])
    state = dict(model.state_dict())
    del state["model.layers.2.self_attn.k_norm.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.k_norm\.weight"):
        Qwen3Weights(spec_of(model), state)
    state = dict(model.state_dict(), **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        Qwen3Weights(spec_of(model), state)


def test_from_hf_folder(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = Qwen3Weights.from_hf(tmp_path)
    assert weights.spec == spec_of(model)
    assert weights.spec.rope_theta == 1e6 and weights.spec.head_dim == 16 and weights.spec.num_kv_heads == 2
    tokens, positions, mask = trajectory(2)
    torch.testing.assert_close(one_shot(weights, tokens, positions, mask),
                               hf_logits(model, tokens, positions, mask), atol=ATOL, rtol=0)


def test_spec_reads_transformers4_config():
    cfg = {"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
           "rope_theta": 5e5}
    spec = Qwen3Spec.from_hf_config(cfg)
    assert spec.head_dim == 4 and spec.rope_theta == 5e5 and not spec.tie_word_embeddings
