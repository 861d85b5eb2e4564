"""RL math: advantages, rewards, the PAPO filter, policy losses and the algorithm table, checked
against hand-computed values, with negative controls (the reference's bugs, wrong alignments,
clipping switched off)."""
import math
import statistics
import subprocess
import sys
from dataclasses import FrozenInstanceError, replace
from types import SimpleNamespace

import pytest
import torch

from megatron_npr.models import NPRBatch
from megatron_npr.rl.advantages import batch_std, group_advantages, informative
from megatron_npr.rl.algorithms import ALGORITHMS, DAPO, PAPO
from megatron_npr.rl.losses import Clip, align_with_targets, align_with_tokens, policy_loss
from megatron_npr.rl.rewards import dapo_rewards, overlong_penalty, papo_filter
from megatron_npr.rollout.rollout import Rollout
from megatron_npr.topology import Layout, build_layout, pack
from megatron_npr.training.samples import to_sample
from npr_reference import TAGS

G, g, P, p, S, s, K, k = TAGS.ids
EOS = 99
LABEL = {j: [50 + j] for j in range(1, 9)}
VOCAB = SimpleNamespace(tags=TAGS, label_ids=lambda j: LABEL[j])
PROMPT = [5, 6, 7, 8, 9, 10]
FLAT = [11, G, P, 12, p, P, 13, p, g, S, 51, 14, 15, s, S, 52, 16, 17, 18, s, K, 19, k, 20, EOS]
FLAT_FORCED = {9, 10, 14, 15, 20}  # <step> 1:, <step> 2:, <takeaway> (by hand)
NESTED = [G, P, 12, p, P, 13, p, g, S, 51, 14, G, P, 32, p, P, 33, p, g, S, 51, 34, s, S, 52, 35, 36, s,
          K, 37, k, 38, s, S, 52, 16, s, K, 19, k, 20, EOS]
VALID = ("Two independent parts.<guideline>\n<plan>1: add</plan>\n<plan>2: multiply</plan>\n</guideline>"
         "<step>1: 2+3=5</step><step>2: 2*3=6</step><takeaway>5+6=11</takeaway>\nSo \\boxed{11}.")

# ---------------------------------------------------------------- advantages
# groups deliberately interleaved, uneven, non-contiguous ids, one singleton (42), one all-equal (3)
REWARDS = [1.0, -1.0, -1.0, 1.0, 0.5, 1.0, -1.0, -0.5, 1.0]
GROUPS = [7, 3, 7, 42, 9, 7, 3, 9, 7]
# group 7 = [1, -1, 1, 1]: mean 0.5, unbiased var (0.25 + 2.25 + 0.25 + 0.25) / 3 = 1
# group 9 = [0.5, -0.5]: mean 0, unbiased std sqrt(0.5); group 3 = [-1, -1]: all equal
DEV = [0.5, 0.0, -1.5, None, 0.5, 0.5, 0.0, -0.5, 0.5]  # R - group mean (None: singleton)


def _tensors():
    return torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(GROUPS)


def test_group_std_advantages_by_hand():
    rewards, groups = _tensors()
    eps = 1e-6
    stds = {7: 1.0, 3: 0.0, 9: math.sqrt(0.5)}
    expected = [0.0 if d is None else d / (stds[gr] + eps) for d, gr in zip(DEV, GROUPS)]
    got = group_advantages(rewards, groups, std_over="group")
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx(expected, abs=1e-12)
    assert got[[1, 6]].tolist() == [0.0, 0.0]  # all-equal group
    # verl's convention for a group of one: mean 0, std 1
    raw = group_advantages(rewards, groups, std_over="group", singleton="raw")
    assert raw[3].item() == pytest.approx(1.0 / (1 + eps)) and torch.equal(raw[[0, 1, 2]], got[[0, 1, 2]])


def test_batch_std_advantages_by_hand_and_the_in_place_reference_differs():
    rewards, groups = _tensors()
    eps = 1e-6
    std = statistics.stdev(REWARDS)  # unbiased, of the raw rewards
    expected = [0.0 if d is None else d / (std + eps) for d in DEV]
    got = group_advantages(rewards, groups, std_over="batch", eps=eps)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert batch_std(rewards).item() == pytest.approx(std)
    # the PAPO reference (singleton mean 0) divides element i by the std of the partly rescaled tensor
    ref = rewards.clone()
    means = {gid: (rewards[groups == gid].mean().item() if (groups == gid).sum() > 1 else 0.0) for gid in GROUPS}
    for i, gid in enumerate(GROUPS):
        ref[i] = (ref[i] - means[gid]) / (torch.std(ref) + eps)
    ours_raw = group_advantages(rewards, groups, std_over="batch", eps=eps, singleton="raw")
    assert ours_raw[3].item() == pytest.approx(1.0 / (std + eps))
    assert (ref - ours_raw).abs().max() > 0.05  # the control: its answer is not the formula's


def test_eps_size_one_and_degenerate_batches():
    two = group_advantages(torch.tensor([0.0, 2.0]), torch.tensor([5, 5]), eps=1.0)
    assert two.tolist() == pytest.approx([-1 / (math.sqrt(2) + 1), 1 / (math.sqrt(2) + 1)])
    assert group_advantages(torch.tensor([0.0, 2.0]), torch.tensor([5, 5]), eps=0.0).tolist() == \
        pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])
    one = torch.tensor([1.0])
    assert group_advantages(one, torch.tensor([0]), std_over="batch").tolist() == [0.0]
    assert group_advantages(one, torch.tensor([0]), std_over="batch", singleton="raw").item() == \
        pytest.approx(1.0)  # batch std of one reward is taken as 1, not nan
    # a lone sample next to an all-equal batch: the zero convention avoids R / eps
    equal = torch.tensor([1.0, 1.0, 1.0])
    assert group_advantages(equal, torch.tensor([0, 0, 1]), std_over="batch").tolist() == [0.0, 0.0, 0.0]
    assert group_advantages(equal, torch.tensor([0, 0, 1]), std_over="batch", singleton="raw")[2] > 1e5
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    with pytest.raises(ValueError, match="same length"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="std_over"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), std_over="row")


def test_advantages_never_mutate_and_are_float64_and_shift_invariant():
    rewards, groups = _tensors()
    r0, g0 = rewards.clone(), groups.clone()
    for std_over in ("group", "batch"):
        for singleton in ("zero", "raw"):
            group_advantages(rewards, groups, std_over=std_over, singleton=singleton)
    informative(rewards, groups)
    assert torch.equal(rewards, r0) and torch.equal(groups, g0)
    f32 = group_advantages(rewards.float(), groups)
    ints = group_advantages(torch.tensor([1, 0, 0, 1]), torch.tensor([0, 0, 1, 1]))
    assert f32.dtype == ints.dtype == torch.float64
    assert ints.tolist() == pytest.approx([0.7071, -0.7071, -0.7071, 0.7071], abs=1e-4)
    base = group_advantages(rewards, groups)
    assert torch.allclose(group_advantages(rewards + 3.0, groups), base)  # singleton too (zero convention)
    assert not torch.allclose(group_advantages(rewards + 3.0, groups, singleton="raw"),
                              group_advantages(rewards, groups, singleton="raw"))  # control


def test_informative_marks_groups_whose_rewards_differ():
    rewards, groups = _tensors()
    assert informative(rewards, groups).tolist() == [g_ in (7, 9) for g_ in GROUPS]
    assert informative(torch.tensor([0.5, 0.5000001]), torch.tensor([1, 1])).tolist() == [True, True]
    assert informative(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


# ---------------------------------------------------------------- rewards and the PAPO filter
def test_overlong_penalty_at_its_boundaries():
    assert [overlong_penalty(n, 100, 10) for n in (0, 90, 91, 95, 100)] == pytest.approx([0, 0, -0.1, -0.5, -1.0])
    assert overlong_penalty(100, 100, 10, factor=2.0) == pytest.approx(-2.0)
    assert overlong_penalty(100, 100, 0) == 0.0 and str(overlong_penalty(50, 100, 10)) == "0.0"
    assert overlong_penalty(30000, 30000, 10) == -1.0 and overlong_penalty(29990, 30000, 10) == 0.0
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(5, 10, 11)


def test_dapo_rewards_on_real_texts():
    no_block, empty_takeaway = "Just 11. \\boxed{11}", VALID.replace("5+6=11", "")
    texts = [VALID, VALID, no_block, empty_takeaway, VALID, no_block]
    correct = [True, False, True, True, True, False]
    lengths = [50, 50, 50, 50, 100, 100]
    rewards, reasons = dapo_rewards(texts, correct, lengths, max_new_tokens=100, overlong_buffer=10)
    assert rewards == pytest.approx([1.0, -1.0, -2 * math.tanh(1.0), -2 * math.tanh(0.2), 0.0,
                                     -2 * math.tanh(1.0) - 1.0])
    assert reasons == [None, None, "missing_block", "empty_takeaway", None, "missing_block"]
    with pytest.raises(ValueError, match="one entry per rollout"):
        dapo_rewards(texts, correct[:2], lengths, max_new_tokens=100, overlong_buffer=10)


def _rollout(response, finish="stop", *, layout="build", max_depth=1, prompt=PROMPT):
    ids = prompt + response
    if layout == "build":
        layout = build_layout(ids, TAGS, len(prompt), max_depth)
    n = len(response)
    return Rollout(ids, len(prompt), layout, [-1.0] * n, [False] * n, list(range(len(ids))), finish)


def test_papo_filter_reasons():
    plain = [11, 12, 13, EOS]
    cut = FLAT[:12] + [EOS]  # the engine stopped a branch at EOS
    rollouts = [
        _rollout(FLAT),
        _rollout(FLAT[:12], "length", layout=None),
        _rollout(FLAT, "length"),  # length wins even when the structure would parse
        _rollout(plain, layout=Layout.causal(len(PROMPT) + len(plain))),
        _rollout(cut, "invalid_structure", layout=None),
        _rollout(FLAT, "invalid_structure", layout=None),
        _rollout(FLAT, layout=None),
        _rollout(NESTED, layout=None),
    ]
    assert papo_filter(rollouts, TAGS) == [None, "length", "length", "missing_block", "unclosed_block",
                                           "invalid_structure", "invalid_structure", "nesting_too_deep"]
    assert papo_filter([_rollout(NESTED, max_depth=2)], TAGS, max_depth=2) == [None]
    assert DAPO.drop_reasons(rollouts, TAGS) == [None] * len(rollouts)
    assert PAPO.drop_reasons(rollouts, TAGS) == papo_filter(rollouts, TAGS)


# ---------------------------------------------------------------- losses
def _batch(advantages, olds=None, prompts=(PROMPT, PROMPT[:3])):
    """One packed row per call: FLAT after each prompt, with per-sample advantage and old log-probs."""
    samples = []
    for i, (a, prompt) in enumerate(zip(advantages, prompts)):
        extras = {"advantages": torch.full((len(FLAT),), float(a))}
        if olds is not None:
            extras["old_logprobs"] = olds[i]
        samples.append(to_sample(prompt, FLAT, VOCAB, extras=extras))
    rows = pack(samples, 200)
    assert len(rows) == 1
    return NPRBatch.from_rows(rows, length=72), rows[0]


def _expected_targets(row, advantages, prompts=(PROMPT, PROMPT[:3])):
    """By hand: position j-1 predicts response token j unless j is forced; value = its sample's A."""
    adv, valid = torch.zeros(72, dtype=torch.float64), torch.zeros(72, dtype=torch.bool)
    for i, lo in zip(row.sample_indices, row.doc_offsets):
        r0 = lo + len(prompts[i])
        for j in range(len(FLAT)):
            if j not in FLAT_FORCED:
                valid[r0 + j - 1], adv[r0 + j - 1] = True, advantages[i]
    return adv, valid


def test_papo_gradient_equals_minus_mean_advantage_times_grad_logp_through_a_tiny_model():
    advantages = [0.7, -1.3]
    batch, row = _batch(advantages)
    adv, valid = _expected_targets(row, advantages)
    assert torch.equal(batch.targets()[1][0], valid)  # the mask leaves out prompts, forced tokens, boundaries
    torch.manual_seed(0)
    W = torch.randn(128, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 72, 8, dtype=torch.float64)
    targets = batch.targets()[0]

    def logprobs():
        return torch.log_softmax(x @ W.T, -1).gather(-1, targets[..., None]).squeeze(-1)

    loss, count, metrics = policy_loss(batch, logprobs(), clip=None)
    n = int(valid.sum())
    assert count.item() == n and not count.is_floating_point()
    assert (loss / count).item() == pytest.approx(-adv[valid].mean().item())  # the value is -mean(A)
    assert metrics["pg_loss"].tolist() == pytest.approx([loss.item(), n])
    (loss / count).backward()
    lp = logprobs()
    by_hand = sum(-adv[i] / n * torch.autograd.grad(lp[0, i], W, retain_graph=True)[0]
                  for i in torch.nonzero(valid).flatten().tolist())
    assert torch.allclose(W.grad, by_hand, atol=1e-12) and W.grad.abs().sum() > 0
    # control: extras read unshifted would give the last prompt token (predicting the first response
    # token) a zero advantage: then the gradient differs
    unshifted = replace(batch, extras={"advantages": align_with_tokens(batch.extras["advantages"])})
    W.grad = None
    (policy_loss(unshifted, logprobs(), clip=None)[0] / count).backward()
    assert not torch.allclose(W.grad, by_hand, atol=1e-6)


def test_forced_tokens_and_prompt_get_zero_gradient():
    olds = [torch.full((len(FLAT),), -2.0), torch.full((len(FLAT),), -2.0)]
    batch, row = _batch([1.0, -1.0], olds)
    adv, valid = _expected_targets(row, [1.0, -1.0])
    for clip in (None, Clip()):
        lp = torch.full((1, 72), -2.0, requires_grad=True)
        policy_loss(batch, lp, clip=clip)[0].backward()
        assert torch.equal(lp.grad[0] != 0, valid)
        assert torch.allclose(lp.grad[0], -adv.float())  # ratio 1: gradient -A exactly where trained
        # control: training the engine-inserted tokens too gives them gradient
        r0 = row.doc_offsets[row.sample_indices.index(0)] + len(PROMPT)
        forced_mask = batch.loss_mask.clone()
        forced_mask[0, r0:r0 + len(FLAT)] = True
        lp2 = torch.full((1, 72), -2.0, requires_grad=True)
        policy_loss(replace(batch, loss_mask=forced_mask), lp2, clip=clip)[0].backward()
        assert all(lp2.grad[0, r0 + j - 1] != 0 for j in FLAT_FORCED)


def _expected_loss(a, r, clip):
    if a > 0:
        return -a * min(r, 1 + clip.high)
    if r < 1 - clip.low:
        return -a * (1 - clip.low)
    return -a * min(r, clip.dual)


def _is_clipped(a, r, clip):
    return (a > 0 and r > 1 + clip.high) or (a < 0 and (r < 1 - clip.low or r > clip.dual))


RATIOS = {1.0: [1.0, 1.27, 1.3, 0.5, 2.0, 0.1], -1.0: [0.79, 0.85, 1.5, 11.0, 9.0, 1.0]}


def test_dapo_clipping_zeroes_the_gradient_exactly_where_a_clipped_side_is_active():
    torch.manual_seed(1)
    olds = [-torch.rand(len(FLAT)) * 3 - 0.1 for _ in range(2)]
    batch, row = _batch([1.0, -1.0], olds)
    adv, valid = _expected_targets(row, [1.0, -1.0])
    old_t = align_with_targets(batch.extras["old_logprobs"])[0]
    ratio = torch.ones(72)
    seen = {1.0: 0, -1.0: 0}
    for i in torch.nonzero(valid).flatten().tolist():
        a = adv[i].item()
        ratio[i] = RATIOS[a][seen[a] % 6]
        seen[a] += 1
    lp0 = torch.where(valid, old_t + ratio.log(), torch.full((72,), 60.0))  # wild values off the mask
    for clip, any_clipped in ((Clip(), True), (Clip(low=0.99, high=100.0, dual=1000.0), False)):
        lp = lp0[None].clone().requires_grad_(True)
        loss, count, metrics = policy_loss(batch, lp, clip=clip)
        loss.backward()
        pairs = [(adv[i].item(), ratio[i].item(), i) for i in torch.nonzero(valid).flatten().tolist()]
        assert loss.item() == pytest.approx(sum(_expected_loss(a, r, clip) for a, r, _ in pairs), rel=1e-5)
        clipped = [_is_clipped(a, r, clip) for a, r, _ in pairs]
        assert any(clipped) == any_clipped
        for (a, r, i), c in zip(pairs, clipped):
            expected = 0.0 if c else -a * r
            assert lp.grad[0, i].item() == pytest.approx(expected, rel=1e-5), (a, r, c)
            assert (lp.grad[0, i] == 0) == c  # exactly zero on a clipped side, nonzero elsewhere
        assert torch.isfinite(lp.grad).all() and (lp.grad[0][~valid] == 0).all()
        assert metrics["clip_fraction"].tolist() == pytest.approx([sum(clipped), count.item()])
        assert metrics["dual_clip_fraction"][0].item() == sum(a < 0 and r > clip.dual for a, r, _ in pairs)
        assert metrics["ratio"][0].item() / count.item() == pytest.approx(sum(r for _, r, _ in pairs) / len(pairs),
                                                                         rel=1e-5)
        assert metrics["approx_kl"][0].item() > 0


def test_a_diverged_ratio_stays_finite_and_clipped():
    """exp(100) overflows fp32: the log-ratio is clamped, so the clipped side holds (grad 0, not nan)."""
    old = [torch.full((len(FLAT),), -50.0), torch.full((len(FLAT),), -50.0)]
    batch, row = _batch([1.0, -1.0], old)
    adv, valid = _expected_targets(row, [1.0, -1.0])
    lp = torch.full((1, 72), 50.0, requires_grad=True)
    loss, _, metrics = policy_loss(batch, lp, clip=Clip())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and (lp.grad == 0).all()
    n_pos, n_neg = int((valid & (adv > 0)).sum()), int((valid & (adv < 0)).sum())
    assert loss.item() == pytest.approx(-1.28 * n_pos + 10.0 * n_neg)  # clip-higher and dual caps
    assert metrics["clip_fraction"][0].item() == n_pos + n_neg


def test_on_policy_loss_equals_the_clipped_one_only_before_the_policy_moves():
    old = [torch.full((len(FLAT),), -1.5), torch.full((len(FLAT),), -1.5)]
    batch, _ = _batch([0.5, -2.0], old)
    grads = {}
    for shift in (0.0, 0.5):  # 0: the sampling policy itself; 0.5: ratios exp(0.5) > 1.28
        for name, clip in (("on", None), ("clipped", Clip())):
            lp = torch.full((1, 72), -1.5 + shift, requires_grad=True)
            policy_loss(batch, lp, clip=clip)[0].backward()
            grads[name, shift] = lp.grad
    assert torch.equal(grads["on", 0.0], grads["clipped", 0.0])
    assert not torch.allclose(grads["on", 0.5], grads["clipped", 0.5])  # control


def test_alignment_helpers_and_missing_extras():
    x = torch.arange(10.0).reshape(2, 5)
    assert align_with_targets(x).tolist() == [[1, 2, 3, 4, 0], [6, 7, 8, 9, 0]]
    assert torch.equal(align_with_targets(align_with_tokens(x))[:, :-1], x[:, :-1])
    batch, _ = _batch([1.0, 1.0])
    with pytest.raises(KeyError, match="old_logprobs"):
        policy_loss(batch, torch.zeros(1, 72), clip=Clip())
    with pytest.raises(ValueError, match="dual"):
        Clip(dual=1.0)


# ---------------------------------------------------------------- algorithms
def test_algorithm_table():
    assert ALGORITHMS == {"dapo": DAPO, "papo": PAPO}
    assert (DAPO.parallel, DAPO.std_over, DAPO.dynamic_sampling, DAPO.drops_invalid) == (False, "group", True, False)
    assert (PAPO.parallel, PAPO.std_over, PAPO.dynamic_sampling, PAPO.drops_invalid) == (True, "batch", False, True)
    assert PAPO.loss(1).keywords == {"clip": None} and not PAPO.needs_old_logprobs(1)
    assert PAPO.loss(4).keywords == {"clip": Clip(0.2, 0.2, 10.0)} and PAPO.needs_old_logprobs(4)
    assert DAPO.loss(1).keywords == {"clip": Clip(0.2, 0.28, 10.0)} and DAPO.needs_old_logprobs(1)
    assert DAPO.loss(2, Clip(0.1, 0.1, 3.0)).keywords == {"clip": Clip(0.1, 0.1, 3.0)}
    assert DAPO.loss(1).func is policy_loss
    with pytest.raises(FrozenInstanceError):
        DAPO.name = "x"
    with pytest.raises(ValueError, match="updates_per_batch"):
        PAPO.loss(0)


def test_algorithms_score_select_and_normalise_differently():
    rewards, groups = _tensors()
    assert DAPO.select(rewards, groups).tolist() == informative(rewards, groups).tolist()
    assert PAPO.select(rewards, groups).all()
    assert torch.equal(DAPO.advantages(rewards, groups), group_advantages(rewards, groups, std_over="group"))
    assert torch.equal(PAPO.advantages(rewards, groups), group_advantages(rewards, groups, std_over="batch"))
    texts, correct, lengths = [VALID, "Just 11. \\boxed{11}"], [True, True], [10, 10]
    assert PAPO.score(texts, correct, lengths, max_new_tokens=100) == ([1.0, 1.0], [None, None])
    assert DAPO.score(texts, correct, lengths, max_new_tokens=100, overlong_buffer=10) == \
        dapo_rewards(texts, correct, lengths, max_new_tokens=100, overlong_buffer=10)
    assert PAPO.score([VALID], [False], [100], max_new_tokens=100, overlong_buffer=10)[0] == [-2.0]


def test_rl_math_imports_no_megatron():
    code = ("import sys, megatron_npr.rl.algorithms, megatron_npr.rl.advantages, megatron_npr.rl.losses, "
            "megatron_npr.rl.rewards; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformers')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
