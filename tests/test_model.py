"""Qwen3 on Megatron-Core with NPR layouts, in one process (TP=PP=1), against HF transformers."""
import pytest
import torch

from megatron_npr.checkpoint import hf_to_mcore
from megatron_npr.models import (ModelConfigError, build_model, forward_logits, token_logprobs,
                                 transformer_config_from_hf)
from model_fixtures import additive_mask, hf_reference_logits, megatron_from_hf, npr_batch, tiny_hf_model

TOL = 1e-5


def test_config_from_hf_maps_every_field():
    cfg = transformer_config_from_hf(tiny_hf_model(tied=True).config, tp=2, pp=2, dtype=torch.float32)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (4, 64, 128)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (4, 2, 16)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 256 and cfg.rotary_base == 1e6
    assert cfg.qk_layernorm and cfg.gated_linear_unit and cfg.normalization == "RMSNorm"
    assert cfg.mrope_section == [8, 0, 0] and cfg.params_dtype == torch.float32


@pytest.mark.parametrize("change,kw,message", [
    ({"model_type": "llama"}, {}, "model_type 'llama'"),
    ({}, {"tp": 4}, "tp=4 does not divide num_key_value_heads=2"),
    ({}, {"pp": 3}, "pp=3 does not divide num_hidden_layers=4"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, {}, "rope scaling 'yarn'"),
    ({"hidden_size": 0}, {}, "hidden_size must be a positive integer"),
    ({}, {"attention_backend": "magic"}, "attention backend 'magic'"),
])
def test_config_rejects_what_it_cannot_build(change, kw, message):
    cfg = {**tiny_hf_model().config.to_dict(), **change}
    with pytest.raises(ModelConfigError) as err:
        transformer_config_from_hf(cfg, **kw)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_and_logprobs_match_hf_on_npr_batches(megatron, tied):
    hf = tiny_hf_model(tied=tied)
    model = megatron_from_hf(hf).eval()
    batch = npr_batch()
    ref = hf_reference_logits(hf, batch)
    with torch.no_grad():
        assert (forward_logits(model, batch) - ref).abs().max() <= TOL
        logprobs = token_logprobs(model, batch)
    targets, valid = batch.targets()
    ref_lp = torch.log_softmax(ref.double(), -1).gather(-1, targets[..., None])[..., 0]
    assert valid.sum() > 50
    assert ((logprobs - ref_lp).abs() * valid).max() <= TOL


def test_negative_controls_wrong_positions_and_wrong_qkv_layout(megatron):
    hf = tiny_hf_model()
    batch = npr_batch()
    ref = hf_reference_logits(hf, batch)
    model = megatron_from_hf(hf).eval()
    plain = batch.position_ids.clone()
    batch.position_ids = torch.arange(batch.tokens.shape[1]).expand_as(plain).clone()
    with torch.no_grad():
        assert (forward_logits(model, batch) - ref).abs().max() > 100 * TOL
    batch.position_ids = plain
    state = hf_to_mcore(hf.state_dict(), hf.config)
    for i in range(hf.config.num_hidden_layers):  # [q; k; v] stacked instead of grouped per KV head
        h = f"model.layers.{i}.self_attn."
        state[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.cat(
            [hf.state_dict()[h + n] for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight")])
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert (forward_logits(model, batch) - ref).abs().max() > 100 * TOL


def test_gradients_match_hf(megatron):
    hf = tiny_hf_model().train()
    model = megatron_from_hf(hf).train()
    batch = npr_batch()
    targets, valid = batch.targets()
    loss = -(token_logprobs(model, batch) * valid).sum() / valid.sum()
    loss.backward()
    logits = hf(input_ids=batch.tokens, attention_mask=additive_mask(batch.dense_mask()),
                position_ids=batch.position_ids).logits
    ref_loss = -(torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] * valid).sum() / valid.sum()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= TOL
    ref_grads = hf_to_mcore({n: p.grad for n, p in hf.named_parameters()}, hf.config)
    worst = max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters())
    assert worst <= TOL


def test_flex_backend_matches_sdpa_and_hf(megatron):
    hf = tiny_hf_model()
    batch = npr_batch()
    ref = hf_reference_logits(hf, batch)
    model = megatron_from_hf(hf, attention_backend="flex").eval()
    with torch.no_grad():
        assert (forward_logits(model, batch) - ref).abs().max() <= TOL
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="no backward on CPU"):
            token_logprobs(model.train(), batch)


def test_unavailable_backends_fail_clearly(megatron, monkeypatch):
    """Checked on every machine: transformer-engine missing, or present without a GPU, or an
    unknown backend name, each fails before a model is built, naming what is missing."""
    import sys
    import types
    cfg = transformer_config_from_hf(tiny_hf_model().config, dtype=torch.float32)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # `import transformer_engine` fails
    with pytest.raises(RuntimeError, match="needs transformer-engine and CUDA"):
        build_model(cfg, attention_backend="te")
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no GPU"):
        build_model(cfg, attention_backend="te")
    with pytest.raises(ValueError, match="'fa3'; choose one of"):
        build_model(cfg, attention_backend="fa3")


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_full_recompute_gives_the_same_loss_and_gradients(megatron, backend):
    """parallel.recompute=full (Megatron's full/uniform checkpointing, one layer per chunk) changes
    what backward keeps, not what it computes: loss and every gradient agree with no recompute.
    Negative control: the recompute flag really reaches the decoder (its checkpointed forward runs).
    With triton (as with flex) the layout crosses Megatron's checkpoint as a tensor: save_for_backward
    refused the layout object, which the first GPU run found."""
    from unittest import mock

    from megatron.core.transformer.transformer_block import TransformerBlock

    hf = tiny_hf_model().train()
    batch = npr_batch()
    _, valid = batch.targets()
    results = {}
    for recompute in ("none", "full"):
        model = megatron_from_hf(hf, recompute=recompute, attention_backend=backend).train()
        assert model.config.recompute_granularity == (None if recompute == "none" else "full")
        with mock.patch.object(TransformerBlock, "_checkpointed_forward", autospec=True,
                               side_effect=TransformerBlock._checkpointed_forward) as checkpointed:
            loss = -(token_logprobs(model, batch) * valid).sum() / valid.sum()
            loss.backward()
        assert checkpointed.called == (recompute == "full")
        results[recompute] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (loss_none, grads_none), (loss_full, grads_full) = results["none"], results["full"]
    assert abs(loss_none - loss_full) <= 1e-6
    assert max((grads_none[n] - grads_full[n]).abs().max().item() for n in grads_none) <= 1e-6


def test_recompute_knob_is_validated():
    from megatron_npr.config import ConfigError, load_config
    from megatron_npr.training.sft_config import SFTConfig

    base = ["model.hf_dir=m", "data.path=d", "train.out_dir=o"]
    assert load_config(SFTConfig, None, [*base, "parallel.recompute=full"]).parallel.recompute == "full"
    with pytest.raises(ConfigError, match="parallel.recompute"):
        load_config(SFTConfig, None, [*base, "parallel.recompute=selective"])
    with pytest.raises(ModelConfigError, match="parallel.recompute='some'"):
        transformer_config_from_hf(tiny_hf_model().config, recompute="some")


def test_a_packed_layout_is_unpacked_once_per_batch():
    """`unpack_layout` gives the same prepared object for the packed tensor and for a detached copy
    of it (what recomputation hands the layer), a different one for another batch, and the same
    arrays as the batch's."""
    from megatron_npr.models.attention import attention_inputs, unpack_layout

    batch, other = npr_batch(), npr_batch(seed=2)
    packed = attention_inputs(batch, "triton")
    layout = unpack_layout(packed, "triton")
    assert unpack_layout(packed.detach(), "triton") is layout
    assert unpack_layout(attention_inputs(other, "triton"), "triton") is not layout
    for name in ("doc_start", "hole_lo", "hole_hi"):
        assert torch.equal(getattr(layout, name), getattr(batch, name))
