"""Weights over a process group in SGLang 0.5.21's `update_weights_from_distributed` format
(megatron_npr.rollout.weight_transport): a 3-rank gloo group on CPU, both wire formats, our
receivers and one written from the research note's description of SGLang's, and the checks
that name a wrong dtype, shape, name or order."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_npr.distributed import free_port
from megatron_npr.rollout.weight_transport import (TransportError, WeightMeta, check_bucket, check_expected,
                                                   describe, flatten, unflatten)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.multirank
def test_three_ranks_receive_every_tensor_bitwise_in_both_formats(tmp_path):
    """Rank 0 streams a tiny Qwen3 (fp32 and bf16 buckets) to ranks 1 and 2: with our
    announcement and SGLang's out-of-band metadata, one broadcast per tensor and flattened, every
    tensor arrives bitwise; an engine with other weights holds the sender's after the update."""
    port, world = free_port(), 3
    worker = ROOT / "tests" / "workers" / "weight_group.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    results = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(world)]
    assert results[0]["ours"] == results[0]["ours_flat"] > 10  # tensors sent per update
    for r in (1, 2):
        assert {k: results[r][k] for k in ("ours", "ours_flat", "sglang", "sglang_flat")} == dict.fromkeys(
            ("ours", "ours_flat", "sglang", "sglang_flat"), True), results[r]
    assert results[1]["engine"] is True


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from model_fixtures import tiny_hf_model
    folder = tmp_path_factory.mktemp("hf") / "untied"
    tiny_hf_model(tied=False, layers=2, seed=0).save_pretrained(folder)
    return folder


@pytest.mark.multirank
@pytest.mark.parametrize("tp, pp, flattened", [(2, 1, True), (1, 2, False)], ids=["tp2-flattened", "pp2-per-tensor"])
def test_trainer_ranks_sync_two_engine_ranks(tiny_hf, tmp_path, tp, pp, flattened):
    """A TP2 or PP2 trainer takes a step, then streams its weights over the group to 2 engine
    processes: each receives every tensor bitwise equal to the trainer's HF export, and its
    log-probs of a probe sequence equal the trainer's within 1e-5. Control: before the sync the
    engines' log-probs are more than 1e-3 away (the step moved the model)."""
    worker, port, flag = ROOT / "tests" / "workers" / "trainer_to_engines.py", free_port(), str(int(flattened))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={free_port()}", str(worker), "trainer", str(tiny_hf), str(tmp_path),
                               str(port), str(tp), str(pp), flag], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)]
    procs += [subprocess.Popen([sys.executable, str(worker), "engine", str(tiny_hf), str(tmp_path), str(port), str(r),
                                flag], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
              for r in (1, 2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    trainer = torch.tensor(json.loads((tmp_path / "trainer.json").read_text())["logprobs"], dtype=torch.float64)
    sent = json.loads((tmp_path / "sent.json").read_text())["sent"]
    for r in (1, 2):
        engine = json.loads((tmp_path / f"engine_{r}.json").read_text())
        assert engine["bitwise_export"] and engine["received"] == sent > 10
        after, before = (torch.tensor(engine[k], dtype=torch.float64) for k in ("after", "before"))
        assert (after - trainer).abs().max() <= 1e-5, (after - trainer).abs().max()
        assert (before - trainer).abs().max() > 1e-3


def _bucket():
    torch.manual_seed(0)
    return [("a", torch.randn(3, 4)), ("b", torch.randn(5).to(torch.bfloat16)),
            ("c", torch.arange(6, dtype=torch.int32).reshape(2, 3)), ("d", torch.randn(4, 3).t())]


def test_flattened_bucket_round_trips_bytes_in_list_order():
    bucket = _bucket()
    flat = flatten(bucket)
    assert flat.dtype == torch.uint8 and flat.numel() == 12 * 4 + 5 * 2 + 6 * 4 + 12 * 4
    assert flat[:48].equal(bucket[0][1].reshape(-1).view(torch.uint8))  # the first tensor's bytes come first
    back = unflatten(flat, describe(bucket))
    assert [n for n, _ in back] == ["a", "b", "c", "d"]
    assert all(t.dtype == u.dtype and t.equal(u) for (_, t), (_, u) in zip(bucket, back))  # "d" was non-contiguous
    with pytest.raises(TransportError, match="flattened bucket of 129 bytes for 130 announced"):
        unflatten(flat[:-1], describe(bucket))


def test_the_sender_names_a_bucket_that_differs_from_its_announcement():
    bucket = _bucket()
    metas = describe(bucket)
    check_bucket(metas, bucket)
    with pytest.raises(TransportError, match=r"tensor 0: announced WeightMeta\(name='a'.*about to send.*name='b'"):
        check_bucket(metas, [bucket[1], bucket[0], *bucket[2:]])  # order
    with pytest.raises(TransportError, match=r"tensor 1: announced .*'bfloat16'.*about to send.*'float32'"):
        check_bucket(metas, [bucket[0], ("b", bucket[1][1].float()), *bucket[2:]])  # dtype
    with pytest.raises(TransportError, match=r"tensor 0: .*\(3, 4\).*about to send.*\(12,\)"):
        check_bucket(metas, [("a", bucket[0][1].reshape(12)), *bucket[1:]])  # shape
    with pytest.raises(TransportError, match="announced 4 tensors, the bucket holds 3"):
        check_bucket(metas, bucket[:3])


def test_the_receiver_names_a_tensor_its_model_does_not_hold_as_announced():
    shapes = {"w": (3, 4), "v": (5,)}
    check_expected([WeightMeta("w", "float32", (3, 4)), WeightMeta("v", "bfloat16", (5,))], shapes)
    with pytest.raises(TransportError, match="x: not a tensor of the receiving model"):
        check_expected([WeightMeta("x", "float32", (3, 4))], shapes)
    with pytest.raises(TransportError, match=r"w: announced shape \[4, 3\], the model holds \[3, 4\]"):
        check_expected([WeightMeta("w", "float32", (4, 3))], shapes)
    with pytest.raises(TransportError, match="v: announced bfloat16, the receiver expects float32"):
        check_expected([WeightMeta("v", "bfloat16", (5,))], shapes, torch.float32)
    with pytest.raises(TransportError, match="unknown dtype 'float99'"):
        WeightMeta("w", "float99", (3, 4)).empty("cpu")


def test_an_unreachable_master_is_named_with_its_address():
    from megatron_npr.distributed import RendezvousError, init_weight_group
    port = free_port()  # nobody listens there
    with pytest.raises(RendezvousError, match=rf"rank 1 could not reach 127.0.0.1:{port} within 2 s"):
        init_weight_group("127.0.0.1", port, 2, 1, "weights", timeout_s=2)
