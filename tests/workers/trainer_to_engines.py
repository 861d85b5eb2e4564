"""The trainer's weights to two engine processes over a weight-update group (gloo), for
tests/test_weight_transport.py:

    torchrun --nproc_per_node 2 trainer_to_engines.py trainer HF_DIR OUT PORT TP PP FLAT
    python trainer_to_engines.py engine HF_DIR OUT PORT RANK FLAT          (RANK 1 and 2)

The trainer (TP2 or PP2) takes one optimizer step from HF_DIR, exports OUT/export (the HF
folder, in process), then global rank 0 joins the group as its rank 0 and every trainer rank runs
`broadcast_weights`; its log-probs of a probe sequence go to OUT/trainer.json. Each engine starts
from HF_DIR, scores the probe (before), receives the stream with its model's shapes checked,
loads it, scores the probe again (after), and writes OUT/engine_RANK.json with whether every
received tensor is bitwise the export's.
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402

PROMPT, RESPONSE = 8, 24


def probe():
    g = torch.Generator().manual_seed(7)
    from model_fixtures import TAG_BASE
    ids = torch.randint(3, TAG_BASE, (PROMPT + RESPONSE,), generator=g).tolist()
    return ids[:PROMPT], ids[PROMPT:]


def trainer(hf_dir, out, port, tp, pp, flattened):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_npr.distributed import destroy_distributed
    from megatron_npr.models import NPRBatch
    from megatron_npr.distributed import init_weight_group
    from megatron_npr.sections import ModelSection, OptimSection, ParallelSection
    from megatron_npr.topology import Layout, PackSample, pack
    from megatron_npr.training.trainer import MegatronTrainer, token_nll_loss
    from model_fixtures import npr_batch

    t = MegatronTrainer.build(ModelSection(hf_dir, dtype="fp32"), ParallelSection(tp, pp),
                              OptimSection(lr=1e-2, min_lr=1e-3, weight_decay=0.0), total_steps=2, seed=0,
                              checkpoint_dir=os.path.join(out, "ckpt"))
    t.step([npr_batch(seed=1)], token_nll_loss)
    t.export_hf(os.path.join(out, "export"))
    group = init_weight_group("127.0.0.1", port, 3, 0, timeout_s=120) if dist.get_rank() == 0 else None
    sent = t.broadcast_weights(group, flattened=flattened, bucket_bytes=48 * 1024)
    prompt, response = probe()
    ids = torch.tensor(prompt + response)
    sample = PackSample(ids, torch.arange(len(ids)) >= PROMPT, Layout.causal(len(ids)))
    lp = t.logprobs([NPRBatch.from_rows(pack([sample], 64), length=64, pad_id=0)])
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        with open(os.path.join(out, "trainer.json"), "w") as f:
            json.dump({"logprobs": lp[0][0, PROMPT - 1:len(ids) - 1].tolist(), "sent": sent if sent else None}, f)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "sent.json"), "w") as f:
            json.dump({"sent": sent}, f)
    dist.barrier()
    destroy_distributed()


def engine_logprobs(engine):
    from megatron_npr.rollout import SamplingParams

    prompt, response = probe()
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=len(response), parallel=False)
    return engine.generate([prompt], params, replay=[response])[0].logprobs


def engine(hf_dir, out, port, rank, flattened):
    from safetensors.torch import load_file
    from transformers import Qwen3ForCausalLM

    from megatron_npr.rollout import NPREngine
    from megatron_npr.distributed import init_weight_group
    from megatron_npr.rollout.weight_transport import receive_weights
    from model_fixtures import TAGS

    hf = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    e = NPREngine(hf.config.to_dict(), hf.state_dict(), tags=TAGS, eos_ids=[2], label_ids=lambda j: [j],
                  kv_slots=1024)
    before = engine_logprobs(e)
    group = init_weight_group("127.0.0.1", port, 3, rank, timeout_s=120)
    received = [pair for bucket in receive_weights(group, flattened=flattened, shapes=e.weights.shapes)
                for pair in bucket]
    e.update_weights(received)
    after = engine_logprobs(e)
    export = load_file(os.path.join(out, "export", "model.safetensors"))
    same = sorted(export) == sorted(n for n, _ in received) and all(
        export[n].dtype == t.dtype and export[n].equal(t) for n, t in received)
    with open(os.path.join(out, f"engine_{rank}.json"), "w") as f:
        json.dump({"bitwise_export": same, "received": len(received), "before": before, "after": after}, f)


if __name__ == "__main__":
    role, hf_dir, out, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if role == "trainer":
        trainer(hf_dir, out, port, int(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "1")
    else:
        engine(hf_dir, out, port, int(sys.argv[5]), sys.argv[6] == "1")
