"""SGLangBackend (rollout/sglang_backend.py) against tests/fake_sglang.py, the contract of
shared/research/sglang_backend.md section 6: the fake itself, NPR rollouts equal to NPREngine's up
to each sample's first join, the causal join measured against NPREngine's exact replay, the exact
join refused, and both weight paths (colocated tensors, a distributed group in two processes)."""
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fake_sglang import NOT_IN_SESSION, FakeEngine, write_markov_qwen3
from megatron_npr.distributed import free_port
from megatron_npr.rollout import NPREngine, RolloutBackend, SamplingParams
from megatron_npr.rollout.scheduler import DecodeVocab
from megatron_npr.rollout.sglang_backend import EXACT_JOIN_REFUSED, SGLangBackend, engine_args
from megatron_npr.rollout.sglang_streams import lockstep_cut
from megatron_npr.seeding import stream_seed
from npr_reference import SPACE_IDS, TAGS

ROOT = Path(__file__).resolve().parent.parent
G, g, P, p, S, s, K, k = TAGS.ids
EOS, VOCAB, TEXT, PLAN, COLON, LOOP = 99, 128, list(range(10)), 20, 60, 30
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [0], [3, 3], [5, 1, 2]]


def label_ids(j):
    return [50 + j, COLON]  # "j" ":"


def markov_table() -> torch.Tensor:
    """Next-token probabilities per current token: text, guidelines of 1-4 plans, branches that
    close with </step> (rarely an eos or a nested guideline), takeaways, eos."""
    rows = {t: {**{x: 0.075 for x in TEXT}, G: 0.2, EOS: 0.05} for t in TEXT}
    rows.update({G: {P: 0.92, g: 0.05, EOS: 0.03}, P: {PLAN: 0.95}, PLAN: {PLAN: 0.25, p: 0.75},
                 p: {P: 0.45, g: 0.5, SPACE_IDS[0]: 0.05}, SPACE_IDS[0]: {P: 0.5, g: 0.5}, g: {S: 0.9, 0: 0.1},
                 COLON: {21: 0.4, 22: 0.3, 23: 0.25}, s: {S: 0.5, K: 0.5}, K: {24: 0.95}, 24: {24: 0.35, k: 0.6},
                 k: {**{x: 0.05 for x in TEXT}, EOS: 0.35, G: 0.15}, LOOP: {LOOP: 0.9, EOS: 0.1}})
    rows.update({50 + j: {COLON: 0.95} for j in range(1, 9)})
    rows.update({b: {21: 0.2, 22: 0.2, 23: 0.2, s: 0.36, EOS: 0.01, G: 0.01} for b in (21, 22, 23)})
    table = torch.full((VOCAB, VOCAB), math.log(1e-8))
    for cur in range(VOCAB):
        for nxt, prob in rows.get(cur, {0: 1.0}).items():
            table[cur, nxt] = math.log(prob)
    return table


@pytest.fixture(scope="module", autouse=True)
def original_logprobs():
    with pytest.MonkeyPatch.context() as mp:  # what SGLangBackend.launch sets for the engine
        mp.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from megatron_npr.checkpoint import open_hf_weights
    folder = tmp_path_factory.mktemp("markov")
    config = write_markov_qwen3(folder, markov_table(), EOS)
    with open_hf_weights(folder) as w:
        tensors = {n: w[n] for n in w.keys()}
    return folder, config, tensors


def make_fake(folder, **kw):
    return FakeEngine(**{"model_path": str(folder), "enable_deterministic_inference": True,
                         "skip_tokenizer_init": True, "sampling_defaults": "openai", **kw})


VOCAB_IDS = DecodeVocab(TAGS, frozenset([EOS]), label_ids)


@pytest.fixture(scope="module")
def torch_engine(model):
    _, config, tensors = model
    return NPREngine(config, tensors, tags=TAGS, eos_ids=[EOS], label_ids=label_ids, kv_slots=1 << 14)


# ---------------------------------------------------------------- the fake honours the contract
def _contract_shapes(folder):
    fake = make_fake(folder)
    one = fake.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 3})
    two = fake.generate(input_ids=[[1, 2], [3]], sampling_params={"max_new_tokens": 3, "n": 2})
    assert isinstance(one, dict) and set(one) == {"output_ids", "meta_info"}  # no "text": tokenizer skipped
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
            "weight_version"} <= set(one["meta_info"])
    assert [a["meta_info"]["prompt_tokens"] for a in two] == [2, 2, 1, 1]  # prompt-major, n consecutive
    assert "text" in make_fake(folder, skip_tokenizer_init=False).generate(input_ids=[1], sampling_params={})


def _contract_stops_and_length(folder):
    fake = make_fake(folder)
    stop = fake.generate(input_ids=[LOOP], sampling_params={"max_new_tokens": 60, "stop_token_ids": [LOOP]})
    assert stop["output_ids"] == [LOOP] and stop["meta_info"]["finish_reason"] == {"type": "stop", "matched": LOOP}
    eos = fake.generate(input_ids=[LOOP], sampling_params={"max_new_tokens": 60, "sampling_seed": 1})
    assert eos["output_ids"][-1] == EOS and EOS not in eos["output_ids"][:-1]  # the model's eos stops too
    free = fake.generate(input_ids=[LOOP], sampling_params={"max_new_tokens": 40, "stop_token_ids": [LOOP],
                                                            "ignore_eos": True, "sampling_seed": 1})
    assert len(free["output_ids"]) == 40 and {LOOP, EOS} <= set(free["output_ids"])
    assert free["meta_info"]["finish_reason"] == {"type": "length", "length": 40}


def _contract_radix(folder):
    fake = make_fake(folder)
    a = fake.generate(input_ids=[1, 2, 3, 4], sampling_params={"max_new_tokens": 1})
    assert a["meta_info"]["cached_tokens"] == 0
    assert fake.generate(input_ids=[1, 2, 9], sampling_params={"max_new_tokens": 1})["meta_info"]["cached_tokens"] == 2
    assert fake.generate(input_ids=[1, 2, 3, 4], sampling_params={"max_new_tokens": 1})["meta_info"][
        "cached_tokens"] == 3  # capped at len - 1
    fake.flush_cache()
    assert fake.generate(input_ids=[1, 2, 3, 4], sampling_params={"max_new_tokens": 1})["meta_info"][
        "cached_tokens"] == 0


def _contract_seeds(folder):
    def ids(fake, **sp):
        return fake.generate(input_ids=[1], sampling_params={"max_new_tokens": 12, "ignore_eos": True, **sp})[
            "output_ids"]
    fake = make_fake(folder)
    assert ids(fake, sampling_seed=5) == ids(fake, sampling_seed=5) != ids(fake, sampling_seed=6)
    assert ids(fake) == ids(fake, sampling_seed=42)
    loose = make_fake(folder, enable_deterministic_inference=False, random_seed=0)
    assert ids(loose, sampling_seed=5) != ids(loose, sampling_seed=5)  # ignored without deterministic mode


def _contract_defaults(folder, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(Path(folder) / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    greedy, openai = make_fake(tmp_path, sampling_defaults="model"), make_fake(tmp_path)
    sp = {"max_new_tokens": 10, "ignore_eos": True}
    assert greedy.generate(input_ids=[1], sampling_params={**sp, "sampling_seed": 1})["output_ids"] == \
        greedy.generate(input_ids=[1], sampling_params={**sp, "sampling_seed": 2})["output_ids"]
    assert openai.generate(input_ids=[1], sampling_params={**sp, "sampling_seed": 1})["output_ids"] != \
        openai.generate(input_ids=[1], sampling_params={**sp, "sampling_seed": 2})["output_ids"]


def _contract_state_machine(folder):
    fake = make_fake(folder)
    fake.on_token = lambda rid, out: fake.release_memory_occupation()
    with pytest.raises(RuntimeError, match="idle"):
        fake.generate(input_ids=[1], sampling_params={"max_new_tokens": 2})
    fake.on_token = None
    fake.release_memory_occupation(["kv_cache"])
    with pytest.raises(RuntimeError, match="kv_cache"):
        fake.generate(input_ids=[1], sampling_params={"max_new_tokens": 2})
    fake.resume_memory_occupation(["kv_cache"])
    fake.generate(input_ids=[1], sampling_params={"max_new_tokens": 2})
    assert fake.update_weights_from_tensor([]) == (False, NOT_IN_SESSION)
    assert fake.update_weights_from_distributed([], [], [])[0] is False
    assert fake.destroy_weights_update_group("nope")[0] is False
    assert fake.init_weights_update_group("127.0.0.1", free_port(), 0, 1, "solo", "gloo")[0] is True
    with pytest.raises(ValueError, match="already been created"):
        fake.init_weights_update_group("127.0.0.1", free_port(), 0, 1, "solo", "gloo")
    assert fake.destroy_weights_update_group("solo")[0] is True


def _contract_abort(folder):
    fake = make_fake(folder)
    fake.on_token = lambda rid, out: len(out) == 2 and fake.tokenizer_manager.abort_request(rid=rid)
    answer = fake.generate(input_ids=[1], sampling_params={"max_new_tokens": 9, "ignore_eos": True}, rid="r1")
    assert answer["meta_info"]["finish_reason"]["type"] == "abort" and len(answer["output_ids"]) == 2


def _contract_penalty_counts_output_only(folder):
    """Greedy from [LOOP]: LOOP repeats; a penalty of 50 on the output stops the second LOOP, but
    not the first (the prompt is not penalised)."""
    fake = make_fake(folder)
    plain = fake.generate(input_ids=[LOOP], sampling_params={"max_new_tokens": 4, "temperature": 0})
    penalised = fake.generate(input_ids=[LOOP], sampling_params={"max_new_tokens": 4, "temperature": 0,
                                                                 "repetition_penalty": 50.0})
    assert plain["output_ids"] == [LOOP] * 4 and penalised["output_ids"] == [LOOP, EOS]


def _contract_logprobs(folder, torch_engine, monkeypatch):
    sp = {"max_new_tokens": 8, "ignore_eos": True, "temperature": 0.5, "sampling_seed": 3}
    answer = make_fake(folder).generate(input_ids=[1, 2], sampling_params=sp, return_logprob=True)
    entries = answer["meta_info"]["output_token_logprobs"]
    assert [(e[1], e[2]) for e in entries] == [(t, None) for t in answer["output_ids"]]
    raw = torch_engine.generate([[1, 2]], SamplingParams(max_new_tokens=8, parallel=False),
                                replay=[answer["output_ids"]])[0].logprobs
    assert max(abs(e[0] - r) for e, r in zip(entries, raw)) < 1e-5  # raw model log-probs
    monkeypatch.delenv("SGLANG_RETURN_ORIGINAL_LOGPROB")
    scaled = make_fake(folder).generate(input_ids=[1, 2], sampling_params=sp, return_logprob=True)
    assert max(abs(e[0] - r) for e, r in zip(scaled["meta_info"]["output_token_logprobs"], raw)) > 1e-2


CONTRACT = {"shapes": _contract_shapes, "stops-and-length": _contract_stops_and_length, "radix": _contract_radix,
            "seeds": _contract_seeds, "defaults": _contract_defaults, "state-machine": _contract_state_machine,
            "abort": _contract_abort, "penalty-output-only": _contract_penalty_counts_output_only,
            "logprobs": _contract_logprobs}


@pytest.mark.parametrize("case", CONTRACT)
def test_the_fake_honours_the_contract(case, model, torch_engine, tmp_path, monkeypatch):
    extra = {"defaults": (tmp_path,), "logprobs": (torch_engine, monkeypatch)}.get(case, ())
    CONTRACT[case](model[0], *extra)


def test_unknown_arguments_raise_and_launch_arguments_are_server_args(model):
    with pytest.raises(TypeError, match="unexpected keyword argument.*bogus"):
        make_fake(model[0], bogus=1)
    with pytest.raises(TypeError, match="unexpected keyword argument.*temprature"):
        make_fake(model[0]).generate(input_ids=[1], sampling_params={"temprature": 1.0})
    args = engine_args(model[0], tp_size=2, mem_fraction=0.6, seed=3)
    assert FakeEngine(**args).server_args.tp_size == 2
    assert {k: args[k] for k in ("enable_memory_saver", "sampling_defaults", "skip_tokenizer_init",
                                 "enable_deterministic_inference", "mem_fraction_static", "random_seed")} == {
        "enable_memory_saver": True, "sampling_defaults": "openai", "skip_tokenizer_init": True,
        "enable_deterministic_inference": True, "mem_fraction_static": 0.6, "random_seed": 3}


# ---------------------------------------------------------------- rollouts equal NPREngine's
def first_join(rollout) -> int | None:
    """Index (in the response) of the first forced <takeaway>, or None."""
    r0 = rollout.response_start
    return next((i for i, (t, f) in enumerate(zip(rollout.token_ids[r0:], rollout.forced_mask)) if f and t == K), None)


def penalised(rollout, end: int) -> list[bool]:
    """Sampled branch tokens that follow another sampled token of their branch: SGLang reports
    their log-prob under the repetition-penalised distribution."""
    out, in_branch, sampled = [], False, 0
    for t, f in zip(rollout.token_ids[rollout.response_start:][:end], rollout.forced_mask[:end]):
        if f and t == S:
            in_branch, sampled = True, 0
        out.append(in_branch and not f and sampled > 0)
        sampled += in_branch and not f
        in_branch = in_branch and not (t == s and not f)
    return out


def differences(ours, theirs, penalty: float) -> list[str]:
    """What differs between the torch engine's and the backend's rollouts up to the first join
    (everything, for a sample without one)."""
    bad = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        r0, join = a.response_start, first_join(a)
        end = len(a.forced_mask) if join is None else join + 1
        if a.token_ids[:r0 + end] != b.token_ids[:r0 + end] or a.forced_mask[:end] != b.forced_mask[:end]:
            bad.append(f"sample {i}: tokens or forced mask")
            continue
        if a.positions[:r0 + (end if join is None else join)] != b.positions[:r0 + (end if join is None else join)]:
            bad.append(f"sample {i}: positions")
        skip = penalised(a, end) if penalty != 1.0 else [False] * end
        lp = [abs(x - y) for x, y, f, q in zip(a.logprobs[:end], b.logprobs[:end], a.forced_mask, skip)
              if not f and not q]
        if lp and max(lp) > 1e-5:
            bad.append(f"sample {i}: log-prob off by {max(lp):.2e}")
        if join is None and (a.finish_reason != b.finish_reason or (a.layout is None) != (b.layout is None) or
                             a.stats["branches_per_block"] != b.stats["branches_per_block"] or
                             b.stats["off_policy_tokens"] or len(a.token_ids) != len(b.token_ids)):
            bad.append(f"sample {i}: finish {a.finish_reason}/{b.finish_reason} or stats")
        if a.layout is not None and b.layout is not None and join is None and \
                not torch.equal(a.layout.position_ids, b.layout.position_ids):
            bad.append(f"sample {i}: layout")
    return bad


def kind(rollout) -> str:
    if first_join(rollout) is not None:
        return "joined"
    return rollout.finish_reason + ("-in-block" if rollout.stats["blocks"] else "")


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_rollouts_equal_the_torch_engine_up_to_the_first_join(model, torch_engine, penalty):
    """Same weights, params and seeds: tokens, forced mask, positions, finish and sampled-token
    log-probs (1e-5) agree up to each sample's first join, over budgets that cut some samples
    inside their first block. With a step repetition penalty, SGLang's log-probs of a branch's
    later tokens are the penalised ones (they differ); the rest still agree."""
    backend, kinds, penalised_diff = SGLangBackend(make_fake(model[0]), VOCAB_IDS), {}, []
    for budget, seeds in ((20, None), (26, None), (48, [7, 8, 9, 10, 11, 12])):
        params = SamplingParams(n=4, max_new_tokens=budget, max_branches=3, step_repetition_penalty=penalty, seed=11)
        ours, theirs = torch_engine.generate(PROMPTS, params, seeds=seeds), backend.generate(PROMPTS, params,
                                                                                             seeds=seeds)
        assert differences(ours, theirs, penalty) == []
        for a, b in zip(ours, theirs):
            kinds[kind(a)] = kinds.get(kind(a), 0) + 1
            join = first_join(a)
            end = len(a.forced_mask) if join is None else join + 1
            penalised_diff += [abs(x - y) for x, y, q in zip(a.logprobs, b.logprobs, penalised(a, end)) if q]
            if join is not None:  # the takeaway: NPR puts it after the longest branch, SGLang after all of them
                fork = a.forced_mask.index(True)
                assert b.positions[a.response_start + join] == a.positions[a.response_start + fork] + join - fork
    assert kinds.get("joined", 0) >= 5 and kinds.get("length-in-block", 0) >= 3, kinds
    assert kinds.get("stop", 0) >= 5 and kinds.get("length", 0) >= 1 and kinds.get("invalid_structure", 0) + kinds.get(
        "invalid_structure-in-block", 0) >= 3, kinds
    print(f"\nsample kinds over the budgets (penalty {penalty}): {kinds}")
    if penalty == 1.0:
        assert penalised_diff == [] or max(penalised_diff) <= 1e-5
    else:
        assert len(penalised_diff) >= 10 and max(penalised_diff) > 1e-3


class WrongBranchSeed(SGLangBackend):
    def branch_seed(self, seed, fork, branch):
        return stream_seed(seed, fork, branch + 1)


def test_negative_controls_differ(model, torch_engine):
    """A wrong branch seed, or no step repetition penalty, changes some sample before its first join."""
    params = SamplingParams(n=4, max_new_tokens=48, max_branches=3, step_repetition_penalty=1.3, seed=11)
    ours = torch_engine.generate(PROMPTS, params)
    wrong_seed = WrongBranchSeed(make_fake(model[0]), VOCAB_IDS).generate(PROMPTS, params)
    no_penalty = SGLangBackend(make_fake(model[0]), VOCAB_IDS).generate(
        PROMPTS, SamplingParams(**{**params.__dict__, "step_repetition_penalty": 1.0}))
    assert differences(ours, wrong_seed, 1.3) != [] and differences(ours, no_penalty, 1.3) != []


def test_lockstep_cut_follows_the_torch_engines_order():
    from megatron_npr.rollout.sglang_streams import Piece

    def branch(n, reason=None, eos=False):
        return Piece(tokens=[0] * n, reason=reason, eos_last=eos)
    three = [branch(4), branch(2), branch(6)]
    assert lockstep_cut(three, 100) == ([4, 2, 6], None, False)
    assert lockstep_cut(three, 2) == ([1, 1, 0], "length", False)  # the fork's <step>s, in branch order
    assert lockstep_cut(three, 4) == ([1, 1, 2], "length", False)  # then the last branch first
    assert lockstep_cut(three, 6) == ([2, 2, 2], "length", False)
    assert lockstep_cut(three, 10) == ([4, 2, 4], "length", False)  # branch 2 closed at step 1
    assert lockstep_cut([branch(2), branch(3, "invalid_structure", True)], 5) == ([2, 3], "invalid_structure", True)
    assert lockstep_cut([branch(2), branch(3, "invalid_structure", True)], 4) == ([2, 2], "length", False)


# ---------------------------------------------------------------- the causal join, measured
def test_the_causal_join_is_off_policy_and_counted(model, torch_engine):
    """NPREngine replays each joined response exactly (the takeaway sees every branch's own KV at
    g+1+longest branch): the log-probs SGLang returned for the tokens sampled after the first join
    differ from it, those before agree, and stats['off_policy_tokens'] counts exactly the former."""
    params = SamplingParams(n=4, max_new_tokens=64, max_branches=3, step_repetition_penalty=1.0, seed=5)
    prompts = PROMPTS + [[2, 4], [8], [9, 9, 1]]
    theirs = [r for r in SGLangBackend(make_fake(model[0]), VOCAB_IDS).generate(prompts, params)
              if r.finish_reason == "stop" and first_join(r) is not None]
    exact = torch_engine.generate([r.token_ids[:r.response_start] for r in theirs], SamplingParams(
        **{**params.__dict__, "n": 1}), replay=[r.token_ids[r.response_start:] for r in theirs])
    before, after = [], []
    for b, x in zip(theirs, exact):
        join = first_join(b)
        diffs = [abs(u - v) for u, v, f in zip(b.logprobs, x.logprobs, b.forced_mask) if not f]
        sampled_before = sum(not f for f in b.forced_mask[:join])
        before += diffs[:sampled_before]
        after += diffs[sampled_before:]
        assert b.stats["off_policy_tokens"] == len(diffs) - sampled_before > 0
    mean = sum(after) / len(after)
    print(f"\ncausal join on the toy model: {len(theirs)} joined samples, {len(after)} off-policy sampled tokens, "
          f"|SGLang - exact NPR| log-prob max {max(after):.3f} mean {mean:.3f} (before the join: max {max(before):.1e})")
    assert len(theirs) >= 5 and max(before) <= 1e-5
    assert max(after) > 0.05 and mean > 1e-3


# ---------------------------------------------------------------- refusals, the Protocol, launch
def test_the_exact_join_is_refused_until_validated(model):
    fake = make_fake(model[0])
    for call in (lambda: SGLangBackend(fake, VOCAB_IDS, join="exact"),
                 lambda: SGLangBackend.launch(model[0], vocab=VOCAB_IDS, join="exact")):
        with pytest.raises(ValueError, match="exact-join plugin .* not been validated on a GPU"):
            call()
    assert "sglang_join_plugin.py" in EXACT_JOIN_REFUSED
    with pytest.raises(ValueError, match="join must be .causal., got .fast."):
        SGLangBackend(fake, VOCAB_IDS, join="fast")
    from megatron_npr.rollout import sglang_join_plugin as plugin  # importable without SGLang
    with pytest.raises(NotImplementedError, match="unvalidated: needs a GPU run with SGLang 0.5.21"):
        plugin.admit_join(None, plugin.JoinHint(prefix_len=3, branch_lens=[2, 4], position_offset=0))


def test_backend_is_a_rollout_backend_and_launch_names_the_extra(model):
    assert isinstance(SGLangBackend(make_fake(model[0]), VOCAB_IDS), RolloutBackend)
    from types import SimpleNamespace
    engine, rollout = SimpleNamespace(hf_dir=model[0], dtype="bf16", vocab=lambda: VOCAB_IDS), \
        SimpleNamespace(tp=2, join="causal")
    try:
        import sglang  # noqa: F401
    except Exception:  # noqa: BLE001
        for call in (lambda: SGLangBackend.launch(model[0], vocab=VOCAB_IDS),
                     lambda: SGLangBackend.from_config(engine, rollout)):
            with pytest.raises(ImportError, match=r"sglang==0\.5\.21: pip install -e \.\[rollout\]"):
                call()
    else:
        pytest.skip("SGLang is installed here; launching it needs a GPU")


def test_malformed_and_aborted_answers_name_the_request(model):
    fake = make_fake(model[0])
    backend, params = SGLangBackend(fake, VOCAB_IDS), SamplingParams(max_new_tokens=12, seed=1)
    fake.on_token = lambda rid, out: fake.tokenizer_manager.abort_request(abort_all=True)
    with pytest.raises(RuntimeError, match="SGLang aborted prompt 0 sample 0: prompt 0 sample 0 trunk request 1"):
        backend.generate([[1, 2]], params)
    fake.on_token, real = None, fake.generate

    def drop_logprobs(**kw):
        out = real(**kw)
        for a in out:
            a["meta_info"]["output_token_logprobs"] = a["meta_info"]["output_token_logprobs"][1:]
        return out
    fake.generate = drop_logprobs
    with pytest.raises(RuntimeError, match="malformed SGLang answer to prompt 0 sample 0: .*output_token_logprobs"):
        backend.generate([[1, 2]], SamplingParams(max_new_tokens=12, seed=1))
    fake.generate = lambda **kw: real(**kw)[:-1]
    with pytest.raises(RuntimeError, match="answered 0 for a batch of 1"):
        backend.generate([[1, 2]], params)


# ---------------------------------------------------------------- weights: tensors, memory, versions
def new_bucket(folder, seed=1):
    from megatron_npr.models.qwen3_hf import Qwen3Spec, tensor_shapes
    gen = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(Qwen3Spec.from_hf_config(folder))
    names = ["lm_head.weight", "model.layers.0.self_attn.o_proj.weight", "model.norm.weight"]
    bucket = [(n, torch.randn(shapes[n], generator=gen)) for n in names]
    return bucket[:2] + [(bucket[2][0], bucket[2][1].to(torch.bfloat16))]  # mixed dtypes


def bitwise(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.contiguous().view(-1).view(torch.uint8).equal(
        b.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("flattened", [False, True], ids=["named-tensors", "flattened"])
def test_tensor_path_reaches_every_tp_rank_bitwise(model, flattened):
    fake = make_fake(model[0], tp_size=2)
    backend, bucket = SGLangBackend(fake, VOCAB_IDS, tp_size=2, flattened=flattened), new_bucket(model[0])
    held, real = [], fake.update_weights_from_tensor

    def checked(payloads, load_format=None, flush_cache=True):
        gc.collect()  # a flat buffer that only the payloads' pickles referred to would be gone now
        held.append([(b.dtype, b.numel()) for b in getattr(payloads, "buffers", [])])
        assert flush_cache is False and (load_format == "flattened_bucket") == flattened
        return real(payloads, load_format=load_format, flush_cache=flush_cache)
    fake.update_weights_from_tensor = checked
    fake.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
    with pytest.raises(RuntimeError, match="update_weights_from_tensor failed: .*between begin_weight_update"):
        backend.update_weights(bucket)  # outside a session
    held.clear()
    backend.begin_weight_update()
    assert backend.update_weights(bucket) == 3
    backend.end_weight_update(7)
    received = [pair for call in fake.received for pair in zip(*call)]  # (rank 0 pair, rank 1 pair) per tensor
    assert len(fake.received) == (2 if flattened else 1) and all(len(call) == 2 for call in fake.received)
    assert sorted(r0[0] for r0, _ in received) == sorted(n for n, _ in bucket)
    sent = dict(bucket)
    assert all(bitwise(sent[n0], t0) and bitwise(sent[n1], t1) for (n0, t0), (n1, t1) in received)
    assert all(fake.weights.tensors[n].equal(t.float()) for n, t in bucket)
    group_bytes = [sum(t.numel() * t.element_size() for _, t in bucket if t.dtype == dt)
                   for dt in (torch.float32, torch.bfloat16)]  # one flattened payload set per dtype
    assert held == ([[(torch.uint8, n)] for n in group_bytes] if flattened else [[]])
    assert fake.prefixes == [] and not fake.session  # flushed, session closed
    rollout = backend.generate([[1, 2]], SamplingParams(max_new_tokens=4, seed=1))[0]
    assert rollout.stats["weight_version"] == "7" and backend.weight_version == 7


def test_memory_tags_and_the_colocation_order(model):
    fake = make_fake(model[0])
    backend, params = SGLangBackend(fake, VOCAB_IDS), SamplingParams(max_new_tokens=6, seed=2)
    before = backend.generate([[1, 2]], params)[0].token_ids
    backend.release_memory()
    assert fake.released == {"weights", "kv_cache", "cuda_graph"} and fake.prefixes == []
    with pytest.raises(RuntimeError, match=r"generate after release_memory\(\['cuda_graph', 'kv_cache', 'weights'\]\)"):
        backend.generate([[1, 2]], params)
    backend.resume_memory(["weights"])
    backend.begin_weight_update()
    backend.update_weights([(n, t.clone()) for n, t in fake.weights.tensors.items()])
    backend.end_weight_update(1)
    with pytest.raises(RuntimeError, match="kv_cache"):
        backend.generate([[1, 2]], params)
    backend.resume_memory(["kv_cache", "cuda_graph"])
    assert backend.generate([[1, 2]], params)[0].token_ids == before and not fake.released
    backend.close()
    assert fake.shut


# ---------------------------------------------------------------- weights: the distributed group
@pytest.mark.multirank
def test_distributed_path_two_processes_bitwise_in_both_formats(model, tmp_path):
    """A trainer process (rank 0: init_weight_group + broadcast_bucket) and a FakeEngine behind
    SGLangBackend.join_weight_group / receive_weights in another: every tensor arrives bitwise,
    once per tensor and flattened, and the engine's model holds it."""
    worker, port = ROOT / "tests" / "workers" / "sglang_weights.py", free_port()
    procs = [subprocess.Popen([sys.executable, str(worker), role, str(model[0]), str(tmp_path), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for role in ("sender", "receiver")]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(o[-3000:] for o in outputs)
    result = json.loads((tmp_path / "receiver.json").read_text())
    assert result == {"per_tensor": {"bitwise": True, "model": True}, "flattened": {"bitwise": True, "model": True},
                      "weight_version": "2"}


def test_an_unreachable_group_is_named_with_its_address(model):
    fake, port = make_fake(model[0]), free_port()  # nobody listens there
    fake.group_timeout_s = 1
    with pytest.raises(RuntimeError, match=rf"could not join weight group 'w' at 127.0.0.1:{port} \(ranks 1..1 of 2\)"):
        SGLangBackend(fake, VOCAB_IDS).join_weight_group("127.0.0.1", port, 1, 2, "w", "gloo")


def test_join_plugin_hint_round_trips_and_places_the_takeaway():
    from megatron_npr.rollout.sglang_join_plugin import JoinHint, join_request
    ids, hints = join_request([1, 2, 3], [[S, 51, 7], [S, 52, 7, 7, s]], K, "m1")
    hint = JoinHint.from_kv_hints(hints)
    assert ids == [1, 2, 3, S, 51, 7, S, 52, 7, 7, s, K] and hint == JoinHint(3, [3, 5])
    assert hint.position_delta == -3 and hint.takeaway_position() == 8  # g+1+longest, not 3+3+5
    assert JoinHint.from_kv_hints({"actions": [{"action_type": "other", "action_version": 1}]}) is None
    with pytest.raises(ValueError):
        JoinHint(3, [])


def nesting(rollout) -> int:
    depth = deepest = 0
    for t, f in zip(rollout.token_ids[rollout.response_start:], rollout.forced_mask):
        depth += (t == S and f) - (t == s and not f)
        deepest = max(deepest, depth)
    return deepest


def refused_plan(rollout) -> int | None:
    """Index of the first `</guideline>` the engine did not fork at (on_bad_plan='continue')."""
    ids, forced = rollout.token_ids[rollout.response_start:], rollout.forced_mask
    return next((i for i in range(len(ids) - 1) if ids[i] == g and not forced[i] and not forced[i + 1]), None)


def test_nested_blocks_and_refused_plans_decode_consistently(tmp_path):
    """max_depth=2 and on_bad_plan='continue' (a model whose branches open guidelines): samples
    without a nested block or a refused plan still equal NPREngine's up to their first join, those
    with one agree up to it (later segments use derived seeds), and every layout checks out."""
    from megatron_npr.checkpoint import open_hf_weights
    table = markov_table()
    table[21:24, G], table[21:24, EOS] = math.log(0.08), math.log(0.002)
    config = write_markov_qwen3(tmp_path, table, EOS)
    with open_hf_weights(tmp_path) as w:
        engine = NPREngine(config, {n: w[n] for n in w.keys()}, tags=TAGS, eos_ids=[EOS], label_ids=label_ids,
                           kv_slots=1 << 15)
    backend, prompts = SGLangBackend(make_fake(tmp_path), VOCAB_IDS), [[i % 10, 3 * i % 10] for i in range(20)]
    nested = refused = 0
    for extra in ({"max_depth": 2}, {"on_bad_plan": "continue"}):
        params = SamplingParams(n=2, max_new_tokens=100, max_branches=3, step_repetition_penalty=1.3, seed=3, **extra)
        ours, theirs = engine.generate(prompts, params), backend.generate(prompts, params)
        plain = [i for i, r in enumerate(ours) if nesting(r) < 2 and refused_plan(r) is None]
        assert differences([ours[i] for i in plain], [theirs[i] for i in plain], 1.3) == []
        for a, b in zip(ours, theirs):
            nested += nesting(a) >= 2
            cut = refused_plan(a)
            refused += cut is not None
            if cut is not None:  # equal through the refused </guideline> (or the first join before it)
                end = a.response_start + min(x for x in (cut, first_join(a)) if x is not None) + 1
                assert a.token_ids[:end] == b.token_ids[:end]
    assert nested >= 3 and refused >= 3, (nested, refused)


def test_launch_builds_the_engine_from_the_config(model, monkeypatch):
    """launch/from_config against a stand-in `sglang` module whose Engine is the fake: every
    argument is a ServerArgs field (the fake rejects others), and the log-prob switch is set."""
    from types import SimpleNamespace
    monkeypatch.setitem(sys.modules, "sglang", SimpleNamespace(Engine=FakeEngine, __version__="0.5.21"))
    monkeypatch.delenv("SGLANG_RETURN_ORIGINAL_LOGPROB")
    backend = SGLangBackend.from_config(SimpleNamespace(hf_dir=str(model[0]), dtype="bf16", vocab=lambda: VOCAB_IDS),
                                        SimpleNamespace(tp=2, join="causal"))
    args = backend.engine.server_args
    assert (args.dtype, args.tp_size, args.enable_deterministic_inference, backend.tp_size) == ("bfloat16", 2, True, 2)
    assert os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1" and backend.engine.original_logprob
