"""tools/bench_sync.py's pieces: Qwen3-shaped tensors in HF order and size-bounded buckets."""
import torch

from harness import load_tool


def _bench():
    return load_tool("bench_sync")


def test_buckets_keep_order_and_bound_and_a_large_tensor_goes_alone():
    bench = _bench()
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.uint8)) for i, n in enumerate([3, 4, 10, 2, 2, 5])]
    buckets = bench.buckets_of(tensors, 8)
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3", "t4"], ["t5"]]
    assert [pair for b in buckets for pair in b] == tensors


def test_model_tensors_are_the_hf_names_and_shapes_of_the_model():
    bench = _bench()
    tensors = dict(bench.model_tensors("0.6b", torch.bfloat16))
    assert tensors["model.embed_tokens.weight"].shape == (151936, 1024) and "lm_head.weight" not in tensors
    assert tensors["model.layers.27.self_attn.q_proj.weight"].shape == (16 * 128, 1024)
    assert tensors["model.layers.27.self_attn.k_proj.weight"].shape == (8 * 128, 1024)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (3072, 1024)
    assert "model.layers.28.mlp.up_proj.weight" not in tensors
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    # Qwen3-0.6B: 596,049,920 parameters with the tied embedding counted once
    assert sum(t.numel() for t in tensors.values()) == 596049920
