"""The rollout engine: training-inference consistency, structure, budgets, pool, seeds, penalties."""
import pytest
import torch

from megatron_npr.rollout import NPREngine, SamplingParams, Script, logprob_mismatch
from megatron_npr.rollout import scheduler as scheduler_module
from megatron_npr.topology import parse_structure
from model_fixtures import additive_mask, megatron_from_hf, tiny_hf_model
from npr_reference import TAGS

G, g, P, p, S, s, K, k = TAGS.ids
EOS = 99
LABEL = {j: [50 + j] for j in range(1, 9)}
PROMPT = [5, 6, 7, 8, 9, 10]
FLAT = [11, G, P, 12, p, P, 13, p, g, S, 51, 14, 15, s, S, 52, 16, 17, 18, s, K, 19, k, 20, EOS]
ROUNDS = [G, P, 12, p, P, 13, p, P, 21, p, g, S, 51, 14, s, S, 52, 16, 17, s, S, 53, 22, 23, 24, 25, s,
          K, 19, k, G, P, 26, p, g, S, 51, 27, 28, s, K, 29, k, 30, 31, EOS]
LONG_PROMPT = [1 + (i * 37) % 45 for i in range(1100)]  # > the default prefill_chunk (512): three chunks
NESTED = [G, P, 12, p, P, 13, p, g, S, 51, 14, G, P, 32, p, P, 33, p, g, S, 51, 34, s, S, 52, 35, 36, s,
          K, 37, k, 38, s, S, 52, 16, s, K, 19, k, 20, EOS]


def make_engine(hf=None, **kw):
    hf = hf or tiny_hf_model()
    return NPREngine(hf.config.to_dict(), hf.state_dict(), tags=TAGS, eos_ids=[EOS],
                     label_ids=lambda j: LABEL[j], **{"kv_slots": 4096, **kw})


def hf_logprobs(hf, rollout, shift_at=None):
    """log p(token_i | ...) for every token under HF with the rollout's dense mask and positions."""
    lay = rollout.layout
    positions = lay.position_ids.clone()
    if shift_at is not None:
        positions[shift_at] += 1
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([rollout.token_ids]), attention_mask=additive_mask(lay.dense_mask()),
                    position_ids=positions[None]).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    return [lp[i - 1, rollout.token_ids[i]].item() for i in range(rollout.response_start, len(rollout.token_ids))]


def sampled_diff(rollout, reference):
    return logprob_mismatch(rollout, reference).max().item()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("response,depth", [(FLAT, 1), (ROUNDS, 1), (NESTED, 2)], ids=["flat", "rounds", "nested"])
def test_logprobs_equal_hf_over_the_full_sequence(tied, response, depth):
    hf = tiny_hf_model(tied=tied)
    rollout = make_engine(hf).generate([PROMPT], SamplingParams(max_new_tokens=80, max_depth=depth),
                                       replay=[response])[0]
    assert rollout.finish_reason == "stop" and rollout.token_ids[len(PROMPT):] == response
    assert sampled_diff(rollout, hf_logprobs(hf, rollout)) <= 1e-5
    branch_token = rollout.token_ids.index(S, len(PROMPT)) + 2  # a token inside the first branch
    assert sampled_diff(rollout, hf_logprobs(hf, rollout, shift_at=branch_token)) > 1e-3  # negative control


@pytest.mark.parametrize("prompt,response,chunk", [(PROMPT, FLAT, 512), (PROMPT, ROUNDS, 4),
                                                   (LONG_PROMPT, ROUNDS, 512), (LONG_PROMPT[:700], FLAT, 96)],
                         ids=["short", "short-4-chunks", "1100-3-chunks", "700-8-chunks"])
def test_chunked_prefill_logprobs_equal_hf(prompt, response, chunk):
    """Prompts longer than the prefill chunk: every chunk's queries see the chunks before them."""
    hf = tiny_hf_model()
    rollout = make_engine(hf, prefill_chunk=chunk).generate([prompt], SamplingParams(max_new_tokens=80),
                                                            replay=[response])[0]
    assert rollout.finish_reason == "stop" and rollout.response_start == len(prompt)
    assert sampled_diff(rollout, hf_logprobs(hf, rollout)) <= 1e-5


def test_logprobs_equal_the_megatron_trainer(megatron):
    from megatron_npr.models import NPRBatch, token_logprobs
    from megatron_npr.topology import PackSample, pack

    hf = tiny_hf_model()
    rollouts = make_engine(hf, prefill_chunk=64).generate([PROMPT, PROMPT[:3], LONG_PROMPT[:300]],
                                                          SamplingParams(max_new_tokens=80, max_depth=2),
                                                          replay=[FLAT, ROUNDS, NESTED])
    model = megatron_from_hf(hf)
    for r in rollouts:
        assert r.finish_reason == "stop"
        batch = NPRBatch.from_rows(pack([PackSample(torch.tensor(r.token_ids), torch.ones(len(r.token_ids),
                                                                                             dtype=torch.bool),
                                                    r.layout)], 512))
        with torch.no_grad():
            lp = token_logprobs(model.eval(), batch)[0]
        reference = [lp[i - 1].item() for i in range(r.response_start, len(r.token_ids))]
        assert sampled_diff(r, reference) <= 1e-5


def test_structure_and_forced_tokens():
    rollout = make_engine().generate([PROMPT], SamplingParams(max_new_tokens=80), replay=[ROUNDS])[0]
    structure = parse_structure(rollout.token_ids, TAGS, rollout.response_start)
    forced = [t for t, f in zip(rollout.token_ids[rollout.response_start:], rollout.forced_mask) if f]
    assert forced == [S, 51, S, 52, S, 53, K, S, 51, K]  # <step>+label at each fork, <takeaway> at each join
    assert rollout.stats["branches_per_block"] == [3, 1] and [len(b.branches) for b in structure.blocks] == [3, 1]
    assert rollout.stats["critical_path_tokens"] < rollout.stats["response_tokens"]
    sequential = make_engine().generate([PROMPT], SamplingParams(max_new_tokens=80, parallel=False),
                                        replay=[ROUNDS])[0]
    assert sequential.token_ids == rollout.token_ids and not any(sequential.forced_mask)
    assert sequential.positions == list(range(len(sequential.token_ids)))
    assert torch.equal(sequential.layout.dense_mask(), torch.ones(len(ROUNDS) + 6, len(ROUNDS) + 6).tril().bool())


@pytest.mark.parametrize("response,depth", [(ROUNDS, 1), (NESTED, 2)], ids=["rounds", "nested"])
def test_forced_token_logprobs_are_scored_in_the_engines_context(response, depth):
    """What `Rollout.logprobs` holds for inserted tokens: every branch's `<step>` is scored from
    the trunk after `</guideline>` (the first branch's context), which the flattened sequence
    does not reproduce for branches j >= 2; labels and `<takeaway>` agree with the sequence."""
    hf = tiny_hf_model()
    rollout = make_engine(hf).generate([PROMPT], SamplingParams(max_new_tokens=80, max_depth=depth),
                                       replay=[response])[0]
    flat, r0 = hf_logprobs(hf, rollout), rollout.response_start
    step_opens = set()
    for block in parse_structure(rollout.token_ids, TAGS, r0, depth).iter_blocks():
        opens = [b.start - r0 for b in block.branches]
        step_opens |= set(opens)
        assert all(rollout.forced_mask[i] for i in opens)
        assert max(abs(rollout.logprobs[i] - flat[opens[0]]) for i in opens) <= 1e-5
        assert all(abs(rollout.logprobs[i] - flat[i]) > 1e-3 for i in opens[1:])
    others = [i for i, f in enumerate(rollout.forced_mask) if f and i not in step_opens]
    assert others and max(abs(rollout.logprobs[i] - flat[i]) for i in others) <= 1e-5
    # the one mismatch function leaves every forced token out, and sees any sampled one
    assert logprob_mismatch(rollout, flat).max() <= 1e-5
    assert len(logprob_mismatch(rollout, flat)) == len(flat) - sum(rollout.forced_mask)
    wrong = list(flat)
    wrong[rollout.forced_mask.index(False)] += 0.5
    assert logprob_mismatch(rollout, wrong).max() >= 0.5 - 1e-5
    with pytest.raises(ValueError, match="trainer log-probs"):
        logprob_mismatch(rollout, flat[:-1])


def test_token_budget_counts_every_branch_and_stops_them_together():
    engine = make_engine()
    rollout = engine.generate([PROMPT], SamplingParams(max_new_tokens=16), replay=[ROUNDS])[0]
    assert rollout.finish_reason == "length" and len(rollout.token_ids) - len(PROMPT) == 16
    assert rollout.layout is None and engine.pool.free == engine.pool.num_slots


def test_full_pool_makes_samples_wait_with_identical_results():
    prompts = [PROMPT, PROMPT[:4], PROMPT[2:]]
    params = SamplingParams(n=2, max_new_tokens=40, seed=3)
    roomy = make_engine().generate(prompts, params)
    tight = make_engine(kv_slots=2 * (len(PROMPT) + 40))  # room for one prompt's samples at a time
    assert [r.token_ids for r in tight.generate(prompts, params)] == [r.token_ids for r in roomy]
    with pytest.raises(ValueError, match="needs 172 KV slots"):
        tight.generate([PROMPT + [1] * 40], params)


def test_repetition_penalty_applies_only_to_the_current_branch(monkeypatch):
    calls = []
    real = scheduler_module.penalise

    def spy(logits, seen, penalty):
        calls.append((seen.nonzero().flatten().tolist(), penalty))
        return real(logits, seen, penalty)

    monkeypatch.setattr(scheduler_module, "penalise", spy)
    trunk = Script([G, P, 12, p, P, 13, p, g], forks=[[Script([S, 51, 40, 41]), Script([S, 52, 42])]])
    engine = make_engine()
    params = SamplingParams(max_new_tokens=30, step_repetition_penalty=1.5, seed=0)
    rollout = engine.generate([PROMPT], params, replay=[[0]])[0]  # warm path, no branches: no penalty
    assert calls == [] and rollout.stats["blocks"] == 0
    monkeypatch.setattr(Script, "from_response", classmethod(lambda cls, *a, **k: trunk))
    engine.generate([PROMPT], params, replay=[[0]])  # scripted up to inside each branch, then sampled
    assert calls and all(pen == 1.5 for _, pen in calls)
    seen_sets = [set(x) for x, _ in calls]
    # the first penalised step of each branch sees exactly its own generated tokens: no trunk or
    # forced tokens, nothing of the sibling; later steps never mix the two branches
    assert {40, 41} in seen_sets and {42} in seen_sets
    assert all(({40, 41} <= x) != (42 in x) for x in seen_sets)


def test_seeds_reproduce_and_separate_samples():
    params = SamplingParams(n=4, max_new_tokens=25, seed=7)
    a = make_engine().generate([PROMPT], params)
    b = make_engine().generate([PROMPT], params)
    c = make_engine().generate([PROMPT], SamplingParams(n=4, max_new_tokens=25, seed=8))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert len({tuple(r.token_ids) for r in a}) == 4  # the n samples differ
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


@pytest.mark.parametrize("trunk,reason,params", [
    (Script([G, P, 12, p, g], forks=[[Script([S, 51, 14, EOS])]]), "invalid_structure", {}),  # EOS in a branch
    (Script([G, 12, g]), "invalid_structure", {}),  # no plans
    (Script([G] + [P, 12, p] * 3 + [g]), "invalid_structure", {"max_branches": 2}),  # too many plans
    (Script([G, P, 12, p, g], forks=[[Script([S, 51, G, P, 1, p, g])]]), "invalid_structure", {}),  # too deep
    (Script([G, 12, g, 1, EOS]), "invalid_structure", {"on_bad_plan": "continue"}),  # continues, then fails
])
def test_malformed_outputs_end_cleanly(monkeypatch, trunk, reason, params):
    monkeypatch.setattr(Script, "from_response", classmethod(lambda cls, *a, **k: trunk))
    engine = make_engine()
    rollout = engine.generate([PROMPT], SamplingParams(max_new_tokens=40, **params), replay=[[0]])[0]
    assert rollout.finish_reason == reason and rollout.layout is None
    assert engine.pool.free == engine.pool.num_slots
    assert engine.generate([PROMPT], SamplingParams(max_new_tokens=5))[0].finish_reason in ("stop", "length")


def test_update_weights_switches_the_model_and_names_bad_tensors():
    first, second = tiny_hf_model(seed=0), tiny_hf_model(seed=1)
    engine = make_engine(first)
    assert engine.update_weights(second.state_dict().items()) == len(second.state_dict())
    rollout = engine.generate([PROMPT], SamplingParams(max_new_tokens=80), replay=[FLAT])[0]
    assert sampled_diff(rollout, hf_logprobs(second, rollout)) <= 1e-5
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight"):
        engine.update_weights([("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3))])


def test_tokenizer_tags_must_fit_the_vocabulary(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--add-npr-tokens"):
        NPREngine.from_hf(tmp_path)


def test_sampler_filters_and_parameter_errors():
    from megatron_npr.rollout.sampling import sample_token
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert sample_token(logits, SamplingParams(temperature=0), gen) == 1
    assert {sample_token(logits, SamplingParams(top_k=1), gen) for _ in range(20)} == {1}
    assert {sample_token(logits, SamplingParams(top_p=0.3), gen) for _ in range(20)} == {1}
    assert {sample_token(logits, SamplingParams(top_k=2), gen) for _ in range(200)} == {1, 2}
    with pytest.raises(ValueError, match="top_p=1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="on_bad_plan='skip'"):
        SamplingParams(on_bad_plan="skip")


def test_sampler_frequencies_match_the_distribution():
    """The inverse-CDF sampler draws tokens with their softmax probabilities (zero-probability
    tokens never); a sampler that ignored temperature would fail the 4-sigma bound."""
    from megatron_npr.rollout.sampling import sample_token
    logits = torch.tensor([1.0, float("-inf"), 0.0, 2.0, -0.5])
    params = SamplingParams(temperature=0.7)
    gen = torch.Generator().manual_seed(3)
    n = 6000
    counts = torch.bincount(torch.tensor([sample_token(logits, params, gen) for _ in range(n)]), minlength=5)
    probs = torch.softmax(logits / 0.7, -1)
    assert counts[1] == 0
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 4 * sigma + 1).all(), (counts, n * probs)
    wrong = torch.softmax(logits, -1)  # negative control: temperature 1 is far outside the bound
    assert ((counts - n * wrong).abs() > 4 * sigma + 1).any()
