"""MegatronTrainer on 4 CPU ranks (one torchrun, tests/workers/trainer_export.py): the HF tensors
it gathers in process over TP and PP equal, bit for bit, the model the weights were loaded from
(TP2 x PP2, TP2, PP2; untied and tied embeddings) and the converter's export of the checkpoint it
saves after a training step; a swapped TP shard or one changed element shows up. The step takes
any loss function with Megatron's per-token contract, and its loss is the one `logprobs` gives."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_npr.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "workers" / "trainer_export.py"
BUCKET_BYTES = 48 * 1024  # as in the worker

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Two tiny random HF Qwen3 folders: 4 layers untied, 2 layers tied."""
    from model_fixtures import tiny_hf_model

    root = tmp_path_factory.mktemp("hf")
    tiny_hf_model(tied=False, layers=4, seed=0).save_pretrained(root / "untied")
    tiny_hf_model(tied=True, layers=2, seed=1).save_pretrained(root / "tied")
    return root / "untied", root / "tied"


@pytest.fixture(scope="module")
def four_ranks(hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", f"--master_port={free_port()}",
           str(WORKER), "--untied", str(hf_models[0]), "--tied", str(hf_models[1]), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return out


def _differing(a: dict, b: dict) -> list[str]:
    """Names whose tensors are not bitwise equal (dtype, shape and bytes), or that one side lacks."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return sorted(n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n]))


def _weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("name, source", [("tp2pp2_start", 0), ("tp2", 0), ("pp2", 0), ("tied_tp2pp2", 1)])
def test_gathered_hf_tensors_equal_the_source_model(four_ranks, hf_models, name, source):
    exported = load_file(four_ranks / f"{name}.safetensors")
    assert _differing(exported, _weights(hf_models[source])) == []


def test_buckets_are_bounded_and_in_order(four_ranks, hf_models):
    layout = json.loads((four_ranks / "buckets.json").read_text())
    for name, buckets in layout.items():
        assert len(buckets) > 3, name
        for bucket in buckets:
            assert len(bucket) == 1 or sum(size for _, size in bucket) <= BUCKET_BYTES, (name, bucket)
        names = [n for bucket in buckets for n, _ in bucket]
        assert len(names) == len(set(names))
        assert names[:2] == ["model.embed_tokens.weight", "model.norm.weight"]  # then layer by layer
        layers = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
        assert layers == sorted(layers)
    assert "lm_head.weight" in [n for b in layout["tp2"] for n, _ in b]
    assert "lm_head.weight" not in [n for b in layout["tied_tp2pp2"] for n, _ in b]


def test_trained_tensors_equal_the_converter_and_broken_shards_are_caught(four_ranks, hf_models):
    """After a step at TP2 x PP2, `hf_tensors` is what tools/convert_hf.py makes of the checkpoint
    saved at that step. Negative control: a swapped pair of TP shards and one element moved by one
    ulp change exactly the two HF tensors they belong to."""
    converted = four_ranks / "converted"
    cmd = [sys.executable, str(ROOT / "tools" / "convert_hf.py"), "mcore-to-hf",
           "--ckpt", str(four_ranks / "ckpt" / "step_00000001"), "--out", str(converted)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    trained = load_file(four_ranks / "tp2pp2_trained.safetensors")
    assert _differing(trained, _weights(converted)) == []
    assert len(_differing(trained, _weights(hf_models[0]))) > 10  # the step moved the weights
    broken = load_file(four_ranks / "tp2pp2_broken.safetensors")
    assert _differing(broken, trained) == ["model.layers.0.mlp.gate_proj.weight",
                                           "model.layers.2.self_attn.o_proj.weight"]
    moved = (broken["model.layers.0.mlp.gate_proj.weight"] != trained["model.layers.0.mlp.gate_proj.weight"])
    assert moved.nonzero().tolist() == [[64, 0]]  # row ffn/2: the first row of TP rank 1's gate shard


def test_step_takes_the_loss_function_and_matches_logprobs(four_ranks):
    got = json.loads((four_ranks / "metrics.json").read_text())
    step = got["step"]
    assert abs(step["loss"] - got["logprobs_loss"]) <= 1e-6 * abs(got["logprobs_loss"])
    assert step["tokens_per_microbatch"] == sum(got["counts"]) / 2  # the custom metric, reduced
    assert not step["skipped"] and step["grad_norm"] > 0 and step["lr"] > 0
    assert got["train_state"] == {"step": 1, "note": "train_state round trip"}
