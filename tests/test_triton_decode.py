"""The split-K decode-attention kernel (kernels/npr_decode_attention.py), in Triton's interpreter on
CPU: against a float64 gathered softmax, and inside the rollout engine against its SDPA path and HF."""
import pytest
import torch

pytest.importorskip("triton")

from megatron_npr.kernels import triton_sources  # noqa: E402
from megatron_npr.rollout import SamplingParams  # noqa: E402
from megatron_npr.rollout.qwen3_torch import attention_fn  # noqa: E402
from model_fixtures import tiny_hf_model  # noqa: E402
from npr_reference import TAGS  # noqa: E402
from test_engine import (FLAT, LONG_PROMPT, NESTED, PROMPT, ROUNDS, hf_logprobs, make_engine,  # noqa: E402
                         sampled_diff)

ATOL = 1e-5
LENGTHS = [1, 15, 16, 17, 40, 63, 100]  # a single slot, around a chunk edge, several chunks
NUM_SLOTS = 300


@pytest.fixture(scope="module")
def kernel():
    return triton_sources.load("npr_decode_attention")


def problem(seed, hq, hkv, d, lengths=LENGTHS, dtype=torch.float32, device="cpu"):
    """q [n, hq, d], a random cache [NUM_SLOTS, hkv, d], random slot lists (repeats allowed) whose
    padding holds in-range garbage slots, so a kernel that reads padding gets a wrong answer."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g) for shape in
               ((len(lengths), hq, d), (NUM_SLOTS, hkv, d), (NUM_SLOTS, hkv, d)))
    visible = torch.randint(0, NUM_SLOTS, (len(lengths), max(lengths) + 5), generator=g)
    return (*(t.to(device, dtype) for t in (q, k, v)), visible.to(device), torch.tensor(lengths, device=device))


def reference(q, k, v, visible, lengths):
    """float64 softmax(q k^T / sqrt(d)) v over each row's listed slots; q head h reads kv head h // group."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, length in enumerate(lengths.tolist()):
        slots = visible[i, :length]
        keys, values = (t[slots].double().repeat_interleave(group, 1) for t in (k, v))  # [L, hq, d]
        weights = torch.softmax(torch.einsum("hd,lhd->hl", q[i].double(), keys) / q.shape[2] ** 0.5, -1)
        out[i] = torch.einsum("hl,lhd->hd", weights, values).cpu()
    return out


def max_error(out, ref):
    return (out.double().cpu() - ref).abs().max().item()


@pytest.mark.parametrize("hq,hkv,d,chunk,block_n", [
    (4, 2, 16, 16, 16),  # GQA 4/2, one tile per chunk: 7 chunks
    (4, 2, 32, 64, 16),  # four tiles per chunk: the online softmax inside a chunk
    (8, 2, 64, 32, 32),  # group 4
    (4, 1, 128, 48, 16),  # group 4, d 128, a chunk that is not a power of two
    (2, 2, 64, None, None),  # no GQA, the default chunk (one chunk on CPU)
])
def test_kernel_matches_float64_softmax(kernel, hq, hkv, d, chunk, block_n):
    q, k, v, visible, lengths = problem(hq + d, hq, hkv, d)
    out = kernel.decode_attention(q, k, v, visible, lengths, chunk=chunk, block_n=block_n)
    ref = reference(q, k, v, visible, lengths)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert max_error(out, ref) <= ATOL
    # negative control: a kernel that ignores visible_len attends to the padding as well
    full = torch.full_like(lengths, visible.shape[1])
    assert max_error(kernel.decode_attention(q, k, v, visible, full, chunk=chunk, block_n=block_n), ref) > 1e-2


def test_a_combine_that_drops_the_last_chunk_is_caught(kernel):
    q, k, v, visible, lengths = problem(1, 4, 2, 16)
    parts, lse = kernel.chunk_partials(q, k, v, visible, lengths, chunk=32)
    assert parts.shape[2] == 4  # 105 columns in chunks of 32
    ref = reference(q, k, v, visible, lengths)
    assert max_error(kernel.combine_chunks(parts, lse, q.dtype), ref) <= ATOL
    assert max_error(kernel.combine_chunks(parts[:, :, :-1], lse[:, :, :-1], q.dtype), ref) > 1e-2


def test_padding_is_never_read_and_prefill_rows_share_one_list(kernel):
    """Padding ids past the cache's end, pointing at NaN-filled memory behind it (a read would
    poison the row, without the segfault a far-away id gives); rows given as one expanded slot
    list with different lengths, as the engine's prefill chunks are."""
    q, k, v, visible, lengths = problem(2, 4, 2, 16)
    k, v = (torch.cat([t, torch.full((64, *t.shape[1:]), float("nan"))])[:NUM_SLOTS] for t in (k, v))
    padding = torch.arange(visible.shape[1])[None, :] >= lengths[:, None]
    visible[padding] = NUM_SLOTS + torch.arange(int(padding.sum())) % 64
    out = kernel.decode_attention(q, k, v, visible, lengths, chunk=16)
    assert max_error(out, reference(q, k, v, visible, lengths)) <= ATOL
    shared = torch.randperm(NUM_SLOTS, generator=torch.Generator().manual_seed(3))[:100]
    expanded = shared.expand(len(LENGTHS), -1)  # stride 0 over rows
    out = kernel.decode_attention(q, k, v, expanded, lengths, chunk=32, block_n=16)
    assert max_error(out, reference(q, k, v, expanded, lengths)) <= ATOL


def test_bad_arguments_are_named(kernel):
    q, k, v, visible, lengths = problem(4, 4, 2, 16)
    with pytest.raises(ValueError, match="multiple of block_n"):
        kernel.decode_attention(q, k, v, visible, lengths, chunk=24)
    with pytest.raises(ValueError, match="does not fit"):
        kernel.decode_attention(q[:, :3], k, v, visible, lengths)
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_fn("flash", visible, lengths, 0.25)


# ---------------------------------------------------------------- inside the engine
# name: (prompt, response); prompts of different lengths, so most batched steps pad some rows
RESPONSES = {"flat": (PROMPT, FLAT), "rounds": (LONG_PROMPT[:37], ROUNDS), "nested": (PROMPT[:3], NESTED)}


@pytest.fixture(scope="module")
def rollouts(kernel):
    """The three responses replayed in one batch by the SDPA engine and by the kernel engine
    (32-slot chunks of two 16-slot tiles: contexts of up to 85 slots take up to three chunks)."""
    hf = tiny_hf_model()
    prompts, responses = zip(*RESPONSES.values())
    params = SamplingParams(max_new_tokens=80, max_depth=2)
    sdpa = make_engine(hf).generate(list(prompts), params, replay=list(responses))
    calls, real = [], kernel.decode_attention

    def counted(q, *args, **kwargs):  # proves the engine runs the kernel, and on which rows
        calls.append(q.shape[0])
        return real(q, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel, "default_chunk", lambda *a, **kw: 32)
        mp.setattr(kernel, "BLOCK_N", 16)  # two tiles per chunk: the in-chunk online softmax runs too
        mp.setattr(kernel, "decode_attention", counted)
        triton = make_engine(hf, decode_attention="triton").generate(list(prompts), params, replay=list(responses))
    decoded = sum(len(r) - 1 for r in responses)  # each first response token comes from prefill logits
    assert len(calls) % 4 == 0 and sum(calls) == 4 * decoded, calls  # 4 layers; decoding steps only
    return hf, dict(zip(RESPONSES, zip(sdpa, triton)))


@pytest.mark.parametrize("name", RESPONSES)
def test_engine_logprobs_equal_with_and_without_the_kernel(rollouts, name):
    _, out = rollouts
    sdpa, triton = out[name]
    assert triton.finish_reason == "stop" and triton.token_ids == sdpa.token_ids
    assert triton.forced_mask == sdpa.forced_mask and triton.positions == sdpa.positions
    assert max(abs(a - b) for a, b in zip(triton.logprobs, sdpa.logprobs)) <= ATOL


def test_kernel_engine_logprobs_equal_hf(rollouts):
    hf, out = rollouts
    rollout = out["nested"][1]
    assert sampled_diff(rollout, hf_logprobs(hf, rollout)) <= ATOL
    branch_token = rollout.token_ids.index(TAGS.ids[4], rollout.response_start) + 2  # inside the first <step>
    assert sampled_diff(rollout, hf_logprobs(hf, rollout, shift_at=branch_token)) > 1e-3  # negative control


def test_engine_names_a_bad_decode_attention():
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        make_engine(decode_attention="flex")


def test_config_passes_decode_attention_to_the_engine(monkeypatch):
    from megatron_npr.config import ConfigError, load_config
    from megatron_npr.rl.config import RLConfig
    from megatron_npr.rollout import NPREngine

    built = {}
    monkeypatch.setattr(NPREngine, "from_hf", classmethod(lambda cls, *a, **kw: built.update(kw)))
    required = ["model.hf_dir=m", "data.path=d.jsonl", "rl.out_dir=o"]
    cfg = load_config(RLConfig, None, required + ["engine.decode_attention=triton"])
    cfg.engine.section(cfg.model).build()
    assert built["decode_attention"] == "triton"
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(RLConfig, None, required + ["engine.decode_attention=flash"])


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (32, 8, 128)])
def test_gpu_kernel_vs_sdpa_path(kernel, dtype, hq, hkv, d):
    lengths = [1, 17, 300, 1000, 4097, 64, 2048, 9]
    q, k, v, visible, lengths_t = problem(5, hq, hkv, d, lengths, dtype, "cuda")
    ref = reference(q, k, v, visible, lengths_t)
    sdpa_error = max_error(attention_fn("sdpa", visible, lengths_t, d ** -0.5)(q, k, v), ref)
    for chunk in (None, 256):
        error = max_error(kernel.decode_attention(q, k, v, visible, lengths_t, chunk=chunk), ref)
        bound = 2e-5 if dtype == torch.float32 else 2 * sdpa_error + 1e-3
        assert error <= bound, (chunk, error, sdpa_error)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_engine_logprobs_with_and_without_the_kernel():
    hf = tiny_hf_model()
    params = SamplingParams(max_new_tokens=80, max_depth=2)
    sdpa, triton = (make_engine(hf, device="cuda", decode_attention=a).generate([PROMPT], params, replay=[NESTED])[0]
                    for a in ("sdpa", "triton"))
    assert triton.token_ids == sdpa.token_ids
    assert max(abs(a - b) for a, b in zip(triton.logprobs, sdpa.logprobs)) <= 1e-4
