"""HF Qwen3 <-> Megatron-Core mapping, TP/PP sharding, HF folder I/O, and the one HF Qwen3 reader that
the Megatron config, the mapping and the rollout engine share; on tiny random models."""
import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_npr.checkpoint import (
    CheckpointError, atomic_output_dir, check_parallel_sizes, fuse_qkv, global_to_local_name,
    hf_layer_to_mcore, hf_to_mcore, layer_names_hf, layer_names_mcore, local_to_global_name,
    mcore_to_hf, open_hf_weights, read_hf_config, shard_for_tp, split_qkv, stage_layers,
    stage_of_layer, unshard_tp, write_hf_weights,
)
from megatron_npr.io import OutputError
from megatron_npr.models.qwen3_hf import ModelConfigError, Qwen3Spec, layer_prefix, layer_shapes, tensor_shapes

NH, NG, HD, H, FFN, LAYERS, VOCAB = 4, 2, 16, 64, 128, 4, 256


def tiny_model(tied: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0 if tied else 1)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=NH, num_key_value_heads=NG, head_dim=HD, tie_word_embeddings=tied)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # norms start at 1.0; randomize them so a swapped norm would be caught
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def untied():
    return tiny_model(False)


def saved_state(model) -> dict:
    """The tensors save_pretrained writes: a tied model has no lm_head on disk."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def assert_same_tensors(got: dict, want: dict):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


# ---- whole-model mapping -------------------------------------------------------------------------

def test_round_trip_is_bitwise(model):
    hf = saved_state(model)
    mcore = hf_to_mcore(hf, model.config)
    expected = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
    expected |= {n for i in range(LAYERS) for n in layer_names_mcore(i)}
    if not model.config.tie_word_embeddings:
        expected.add("output_layer.weight")
    assert set(mcore) == expected
    norm = hf["model.layers.2.post_attention_layernorm.weight"]
    assert mcore["decoder.layers.2.pre_mlp_layernorm.weight"] is norm
    assert_same_tensors(mcore_to_hf(mcore, model.config), hf)


def test_plain_dict_config_gives_same_result(model):
    hf = saved_state(model)
    from_dict = hf_to_mcore(hf, model.config.to_dict())
    assert_same_tensors(from_dict, hf_to_mcore(hf, model.config))


def test_tied_lm_head_is_accepted_when_equal_and_refused_when_different():
    model = tiny_model(True)
    full = dict(model.state_dict())  # the in-memory state of a tied model lists lm_head too
    assert "output_layer.weight" not in hf_to_mcore(full, model.config)
    full["lm_head.weight"] = full["lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="lm_head"):
        hf_to_mcore(full, model.config)


def test_missing_and_misshaped_tensors_are_named(untied):
    hf = saved_state(untied)
    del hf["model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        hf_to_mcore(hf, untied.config)
    hf = saved_state(untied)
    hf["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(NG * HD + 1, H)
    with pytest.raises(CheckpointError, match=r"k_proj.*\(33, 64\)"):
        hf_to_mcore(hf, untied.config)
    with pytest.raises(CheckpointError, match="output_layer"):
        mcore_to_hf({k: v for k, v in hf_to_mcore(saved_state(untied), untied.config).items()
                     if k != "output_layer.weight"}, untied.config)


class RecordingState(dict):
    """A dict that records which names were read, to prove one-layer conversion stays in its layer."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)


def test_layer_conversion_reads_only_its_layer(untied):
    state = RecordingState(saved_state(untied))
    out = hf_layer_to_mcore(state, untied.config, 2)
    assert state.read == set(layer_names_hf(2))
    assert set(out) == set(layer_names_mcore(2))


# ---- qkv layout ----------------------------------------------------------------------------------

def test_qkv_rows_are_grouped_per_kv_head(untied):
    hf = saved_state(untied)
    q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    qkv = hf_to_mcore(hf, untied.config)["decoder.layers.1.self_attention.linear_qkv.weight"]
    per = NH // NG
    assert qkv.shape == ((NH + 2 * NG) * HD, H)
    block = lambda b: qkv[b * HD:(b + 1) * HD]  # noqa: E731  (the b-th block of head_dim rows)
    for g in range(NG):
        first = g * (per + 2)
        for j in range(per):
            assert torch.equal(block(first + j), q[(g * per + j) * HD:(g * per + j + 1) * HD])
        assert torch.equal(block(first + per), k[g * HD:(g + 1) * HD])
        assert torch.equal(block(first + per + 1), v[g * HD:(g + 1) * HD])
    # Concrete spot check: the 4th block is k of group 0, not q head 3 (a plain concat would put q there).
    assert torch.equal(qkv[2 * HD:3 * HD], k[:HD])
    # Negative control: the plain [q; k; v] stacking is a different layout.
    assert not torch.equal(torch.cat([q, k, v], dim=0), qkv)


@given(ng=st.integers(1, 3), per=st.integers(1, 3), hd=st.sampled_from([2, 4, 6]), hidden=st.integers(1, 5))
def test_qkv_fuse_split_round_trip(ng, per, hd, hidden):
    dims = Qwen3Spec(vocab_size=1, hidden_size=hidden, intermediate_size=1, num_layers=1, num_heads=ng * per,
                     num_kv_heads=ng, head_dim=hd, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)
    q, k, v = torch.randn(ng * per * hd, hidden), torch.randn(ng * hd, hidden), torch.randn(ng * hd, hidden)
    for got, want in zip(split_qkv(fuse_qkv(q, k, v, dims), dims), (q, k, v)):
        assert torch.equal(got, want)


# ---- tensor parallel -----------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shard_unshard_round_trip(untied, tp):
    mcore = hf_to_mcore(saved_state(untied), untied.config)
    for name, full in mcore.items():
        shards = [shard_for_tp(name, full, tp, r) for r in range(tp)]
        assert torch.equal(unshard_tp(name, shards), full), name
        if full.dim() == 2 and tp > 1:
            assert sum(s.numel() for s in shards) == full.numel(), name


def test_tp_shards_follow_megatron_layout(untied):
    hf, tp = saved_state(untied), 2
    mcore = hf_to_mcore(hf, untied.config)
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    fc1 = mcore["decoder.layers.0.mlp.linear_fc1.weight"]
    rows = FFN // tp
    for r in range(tp):
        shard = shard_for_tp("decoder.layers.0.mlp.linear_fc1.weight", fc1, tp, r)
        assert torch.equal(shard, torch.cat([gate[r * rows:(r + 1) * rows], up[r * rows:(r + 1) * rows]]))
        assert not torch.equal(shard, fc1.chunk(tp, 0)[r])  # fc1 is not a contiguous split
    # qkv: rank r holds exactly the fused rows of KV group r (ng == tp here).
    q, k, v = (hf[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    qkv = mcore["decoder.layers.0.self_attention.linear_qkv.weight"]
    per = NH // NG
    for r in range(tp):
        kv_rows = slice(r * HD, (r + 1) * HD)
        group = torch.cat([q[r * per * HD:(r + 1) * per * HD], k[kv_rows], v[kv_rows]])
        assert torch.equal(shard_for_tp("decoder.layers.0.self_attention.linear_qkv.weight", qkv, tp, r),
                           group)
    o_proj = hf["model.layers.0.self_attn.o_proj.weight"]
    cols = NH * HD // tp
    assert torch.equal(shard_for_tp("decoder.layers.0.self_attention.linear_proj.weight", o_proj, tp, 1),
                       o_proj[:, cols:])
    norm = mcore["decoder.layers.0.input_layernorm.weight"]
    assert shard_for_tp("decoder.layers.0.input_layernorm.weight", norm, tp, 1) is norm


def test_tp_errors(untied):
    with pytest.raises(CheckpointError, match="cannot be split"):
        shard_for_tp("output_layer.weight", torch.zeros(10, 4), 3, 0)
    with pytest.raises(CheckpointError, match="rank"):
        shard_for_tp("output_layer.weight", torch.zeros(8, 4), 2, 2)
    with pytest.raises(CheckpointError, match="bias"):
        shard_for_tp("decoder.layers.0.self_attention.linear_qkv.bias", torch.zeros(8), 2, 0)
    with pytest.raises(CheckpointError, match="differs"):
        unshard_tp("decoder.final_layernorm.weight", [torch.zeros(4), torch.ones(4)])
    check_parallel_sizes(untied.config, tp=2, pp=2)
    with pytest.raises(CheckpointError, match="num_key_value_heads=2"):
        check_parallel_sizes(untied.config, tp=4)


# ---- pipeline parallel ---------------------------------------------------------------------------

@pytest.mark.parametrize("pp", [1, 2, 4])
def test_pp_name_round_trip(untied, pp):
    names = list(hf_to_mcore(saved_state(untied), untied.config))
    for name in names:
        if not name.startswith("decoder.layers."):
            assert global_to_local_name(name, 0, LAYERS, pp) == name
            continue
        layer = int(name.split(".")[2])
        stage = stage_of_layer(layer, LAYERS, pp)
        assert layer in stage_layers(LAYERS, pp, stage)
        local = global_to_local_name(name, stage, LAYERS, pp)
        assert int(local.split(".")[2]) == layer - stage * (LAYERS // pp)
        assert local_to_global_name(local, stage, LAYERS, pp) == name
    assert stage_layers(LAYERS, 2, 1) == range(2, 4)
    assert local_to_global_name("decoder.layers.1.mlp.linear_fc2.weight", 1, LAYERS, 2) == \
        "decoder.layers.3.mlp.linear_fc2.weight"


def test_pp_errors():
    with pytest.raises(CheckpointError, match="4 layers cannot be split evenly into 3"):
        stage_layers(4, 3, 0)
    with pytest.raises(CheckpointError, match="evenly"):
        local_to_global_name("decoder.layers.0.input_layernorm.weight", 0, 4, 3)
    with pytest.raises(CheckpointError, match="not on pipeline stage 0"):
        global_to_local_name("decoder.layers.3.input_layernorm.weight", 0, 4, 2)
    with pytest.raises(CheckpointError, match="holds only 2"):
        local_to_global_name("decoder.layers.2.input_layernorm.weight", 0, 4, 2)


# ---- HF folder I/O -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_dirs(untied, tmp_path_factory):
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    untied.save_pretrained(single, safe_serialization=True)
    untied.save_pretrained(sharded, safe_serialization=True, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    return {"single": single, "sharded": sharded}


@pytest.mark.parametrize("form", ["single", "sharded"])
def test_open_hf_weights_reads_every_tensor(untied, saved_dirs, form):
    assert read_hf_config(saved_dirs[form])["model_type"] == "qwen3"
    with open_hf_weights(saved_dirs[form]) as weights:
        assert_same_tensors({name: weights[name] for name in weights.names()}, saved_state(untied))


def test_write_hf_weights_shards_load_in_transformers(untied, saved_dirs, tmp_path):
    from transformers import Qwen3ForCausalLM
    src = saved_dirs["sharded"]
    cfg = read_hf_config(src)
    with open_hf_weights(src) as weights:
        hf_back = mcore_to_hf(hf_to_mcore(weights, cfg), cfg)  # gate/up and q/k/v come back as views
    out, parts_on_disk = tmp_path / "out", []

    def stream():  # records how many shards were already flushed when each tensor is handed over
        for item in hf_back.items():
            parts_on_disk.append(len(list(out.glob(".model-part-*"))))
            yield item
    weight_map = write_hf_weights(out, stream(), max_shard_bytes=100_000)
    assert parts_on_disk[-1] >= 2  # shards are written while streaming, not all at the end
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and set(weight_map.values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in hf_back.values())
    assert not list(out.glob(".*"))  # no temporary shard names left
    shutil.copy(src / "config.json", out / "config.json")
    loaded = Qwen3ForCausalLM.from_pretrained(out)
    assert_same_tensors(saved_state(loaded), saved_state(untied))


def test_write_hf_weights_single_file_and_refusals(untied, tmp_path):
    state = saved_state(untied)
    assert set(write_hf_weights(tmp_path / "one", state.items()).values()) == {"model.safetensors"}
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
    with open_hf_weights(tmp_path / "one") as weights:
        assert torch.equal(weights["model.norm.weight"], state["model.norm.weight"])
    with pytest.raises(CheckpointError, match="already holds weights"):
        write_hf_weights(tmp_path / "one", state.items())
    with pytest.raises(CheckpointError, match="given twice"):
        write_hf_weights(tmp_path / "dup", [("a", torch.zeros(2)), ("a", torch.zeros(2))])
    assert not list((tmp_path / "dup").iterdir())  # the partial shard was removed


def write_config(folder, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], **overrides}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_bad_hf_folders_name_the_path(saved_dirs, tmp_path):
    missing = tmp_path / "nope"
    for call in (read_hf_config, open_hf_weights):
        with pytest.raises(CheckpointError, match=str(missing)):
            call(missing)
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*config.json"):
        read_hf_config(tmp_path)
    llama = write_config(tmp_path / "llama", model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointError, match="LlamaForCausalLM.*only Qwen3 dense") as info:
        read_hf_config(llama)
    assert str(llama / "config.json") in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_hf_config(tmp_path / "broken")
    (llama / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        open_hf_weights(llama)


def test_corrupt_safetensors_name_the_file(saved_dirs, tmp_path):
    cut = shutil.copytree(saved_dirs["single"], tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=str(cut / "model.safetensors")):
        open_hf_weights(cut)
    lying = shutil.copytree(saved_dirs["sharded"], tmp_path / "lying")
    index = json.loads((lying / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.extra.weight"] = shard
    (lying / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{lying / shard}.*model.extra.weight"):
        open_hf_weights(lying)


def test_atomic_output_dir(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as temp:
            assert temp.parent == tmp_path and temp.name.startswith(".out.tmp-")
            (temp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()  # an existing empty folder is fine and gets replaced
    with atomic_output_dir(target) as temp:
        (temp / "done.txt").write_text("ok")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "done.txt").is_file()
    with pytest.raises(OutputError, match="already exists"):  # the shared megatron_npr.io helper
        with atomic_output_dir(target):
            pass


# ---- one HF Qwen3 reader (models/qwen3_hf.py) for the Megatron config, the mapping and the engine ----

FIELDS = {"model_type": "qwen3", "vocab_size": VOCAB, "hidden_size": H, "intermediate_size": FFN,
          "num_hidden_layers": LAYERS, "num_attention_heads": NH, "num_key_value_heads": NG, "head_dim": HD,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
LAYOUTS = {"transformers4": {**FIELDS, "rope_theta": 5e5},
           "transformers5": {**FIELDS, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}}


def random_state(spec: Qwen3Spec) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) for name, shape in tensor_shapes(spec).items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_reader_reads_both_transformers_layouts_alike(layout, tmp_path):
    from megatron_npr.models import transformer_config_from_hf
    from megatron_npr.rollout.qwen3_torch import Qwen3Weights

    cfg = LAYOUTS[layout]
    spec = Qwen3Spec.from_hf_config(cfg)
    assert spec == Qwen3Spec(vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN, num_layers=LAYERS,
                             num_heads=NH, num_kv_heads=NG, head_dim=HD, rms_norm_eps=1e-5, rope_theta=5e5,
                             tie_word_embeddings=False)
    folder = write_config(tmp_path / "hf", **cfg)
    assert read_hf_config(folder) == read_hf_config(folder / "config.json") == {
        **cfg, "architectures": ["Qwen3ForCausalLM"]}
    assert Qwen3Spec.from_hf_config(folder) == spec
    megatron = transformer_config_from_hf(cfg, dtype=torch.float32)
    assert (megatron.rotary_base, megatron.layernorm_epsilon, megatron.num_query_groups, megatron.kv_channels) == \
        (5e5, 1e-5, NG, HD)
    state = random_state(spec)
    assert Qwen3Weights(spec, state).spec == spec
    assert_same_tensors(hf_to_mcore(state, cfg), hf_to_mcore(state, spec))


@pytest.mark.parametrize("change,message", [
    ({}, "config field rope_theta is missing"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5}}, "rope scaling 'yarn'"),
    ({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling 'linear'"),
    ({"rope_theta": 5e5, "attention_bias": True}, "attention_bias=true"),
    ({"rope_theta": 5e5, "num_key_value_heads": 3}, "num_key_value_heads=3 does not divide num_attention_heads=4"),
    ({"rope_theta": 5e5, "vocab_size": None}, "vocab_size must be a positive integer"),
])
def test_every_reader_refuses_the_same_configs_with_the_same_line(change, message, tmp_path):
    from megatron_npr.models import transformer_config_from_hf
    from megatron_npr.rollout.qwen3_torch import Qwen3Weights

    cfg = {**FIELDS, **change}
    folder = write_config(tmp_path / "hf", **cfg)
    readers = [Qwen3Spec.from_hf_config, transformer_config_from_hf, lambda c: hf_to_mcore({}, c),
               lambda c: check_parallel_sizes(c, 1), lambda _: Qwen3Weights.from_hf(folder)]
    errors = []
    for read in readers:
        with pytest.raises(ModelConfigError) as info:
            read(cfg)
        errors.append(str(info.value))
    assert message in errors[0] and "\n" not in errors[0] and set(errors) == {errors[0]}


def test_engine_loader_and_mapping_check_one_shape_table():
    from megatron_npr.rollout.qwen3_torch import Qwen3Weights

    for tied in (False, True):
        spec = Qwen3Spec.from_hf_config({**LAYOUTS["transformers4"], "tie_word_embeddings": tied})
        table, state = tensor_shapes(spec), RecordingState(random_state(spec))
        assert Qwen3Weights(spec, state).shapes == table
        state.read.clear()
        hf_to_mcore(state, spec)
        assert state.read == set(table)  # the mapping reads every tensor of the table, and nothing else
        assert ("lm_head.weight" in table) != tied
    for i in range(LAYERS):
        assert set(layer_names_hf(i)) == {layer_prefix(i) + name for name in layer_shapes(spec)}
    state = random_state(spec)
    state["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(H, NH * HD + 1)
    with pytest.raises(CheckpointError, match=r"o_proj.*\(64, 65\), expected \(64, 64\)"):
        hf_to_mcore(state, spec)
    with pytest.raises(ValueError, match=r"o_proj.*\(64, 65\), expected \(64, 64\)"):
        Qwen3Weights(spec, state)
