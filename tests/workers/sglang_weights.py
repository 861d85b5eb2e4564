"""Both ends of SGLang's distributed weight path, for tests/test_sglang_backend.py (gloo, CPU):

    python sglang_weights.py sender   MODEL_DIR OUT PORT
    python sglang_weights.py receiver MODEL_DIR OUT PORT

The sender is the trainer: rank 0 of a 2-rank weight group (`init_weight_group`), broadcasting
the buckets of `buckets(MODEL_DIR)` with `broadcast_bucket`, once per tensor and once flattened.
The receiver is a FakeEngine behind `SGLangBackend.join_weight_group` (rank_offset 1) and
`receive_weights`, one begin/end session per bucket. It writes OUT/receiver.json: per format,
whether every received tensor is bitwise the sent one (name, dtype, shape, bytes) and whether the
engine's model now holds it, plus the weight version its answers carry afterwards.
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

import torch  # noqa: E402

GROUP = "npr_weights"


def buckets(model_dir):
    """New values for every tensor of the model, seeded; the second bucket in bf16."""
    from megatron_npr.models.qwen3_hf import Qwen3Spec, tensor_shapes

    g = torch.Generator().manual_seed(3)
    named = [(n, torch.randn(s, generator=g)) for n, s in tensor_shapes(Qwen3Spec.from_hf_config(model_dir)).items()]
    half = len(named) // 2
    return [named[:half], [(n, t.to(torch.bfloat16)) for n, t in named[half:]]]


def same(sent, got) -> bool:
    return len(sent) == len(got) and all(
        n1 == n2 and t1.dtype == t2.dtype and t1.shape == t2.shape and
        t1.contiguous().view(-1).view(torch.uint8).equal(t2.contiguous().view(-1).view(torch.uint8))
        for (n1, t1), (n2, t2) in zip(sent, got))


def sender(model_dir, port):
    from megatron_npr.distributed import init_weight_group
    from megatron_npr.rollout.weight_transport import broadcast_bucket, describe

    group = init_weight_group("127.0.0.1", port, 2, 0, GROUP, "gloo", timeout_s=60)
    for flattened in (False, True):
        for bucket in buckets(model_dir):
            broadcast_bucket(bucket, describe(bucket), group, flattened=flattened)
    finish(group)


def finish(group):
    """Leave together: rank 0 hosts the rendezvous store, and a process that exits while its peer
    still talks to the group can die in C++ teardown ("terminate called without an active exception")."""
    import torch.distributed as dist

    dist.barrier(group=group)
    dist.destroy_process_group(group)


def receiver(model_dir, out, port):
    from fake_sglang import FakeEngine
    from megatron_npr.rollout.scheduler import DecodeVocab
    from megatron_npr.rollout.sglang_backend import SGLangBackend
    from megatron_npr.rollout.weight_transport import describe
    from npr_reference import TAGS

    fake = FakeEngine(model_path=model_dir, enable_deterministic_inference=True, skip_tokenizer_init=True)
    backend = SGLangBackend(fake, DecodeVocab(TAGS, frozenset([99]), lambda j: [50 + j]))
    backend.join_weight_group("127.0.0.1", port, 1, 2, GROUP, "gloo")
    result = {}
    for version, (name, flattened) in enumerate((("per_tensor", False), ("flattened", True)), start=1):
        bitwise = held = True
        for bucket in buckets(model_dir):
            backend.begin_weight_update()
            count = backend.receive_weights(describe(bucket), flattened, GROUP)
            backend.end_weight_update(version)
            bitwise &= count == len(bucket) and same(bucket, fake.received[-1][0])
            held &= all(fake.weights.tensors[n].equal(t.float()) for n, t in bucket)
        result[name] = {"bitwise": bitwise, "model": held}
    answer = fake.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
    result["weight_version"] = answer["meta_info"]["weight_version"]
    with open(os.path.join(out, "receiver.json"), "w") as f:
        json.dump(result, f)
    finish(fake.groups.pop(GROUP))


if __name__ == "__main__":
    role, model_dir, out, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if role == "sender":
        sender(model_dir, port)
    else:
        receiver(model_dir, out, port)
