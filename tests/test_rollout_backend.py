"""The rollout backend interface: NPREngine satisfies RolloutBackend, the memory hooks are no-ops,
prompts are validated, from_hf takes its vocabulary from load_vocab, modules keep to public names."""
import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

import megatron_npr.rollout as rollout_pkg
from megatron_npr.rollout import NPREngine, RolloutBackend, SamplingParams
from model_fixtures import tiny_hf_model
from npr_reference import TAGS

EOS = 99
PROMPT = [5, 6, 7, 8, 9, 10]


def make_engine(**kw):
    hf = tiny_hf_model(layers=1)
    return NPREngine(hf.config.to_dict(), hf.state_dict(), tags=TAGS, eos_ids=[EOS],
                     label_ids=lambda j: [50 + j], **{"kv_slots": 1024, **kw})


@pytest.fixture(scope="module")
def engine():
    return make_engine()


def ids(rollouts):
    return [(r.token_ids, r.logprobs, r.forced_mask, r.positions) for r in rollouts]


# ---------------------------------------------------------------- the Protocol
def test_engine_is_a_rollout_backend(engine):
    assert isinstance(engine, RolloutBackend)

    class NoHooks:  # negative control: generate and update_weights alone are not a backend
        def generate(self, prompts, params, *, seeds=None): ...

        def update_weights(self, named_tensors): ...

    assert not isinstance(NoHooks(), RolloutBackend)


@pytest.mark.parametrize("name", ["generate", "update_weights", "begin_weight_update", "end_weight_update",
                                  "release_memory", "resume_memory", "close"])
def test_engine_methods_accept_every_protocol_call(name):
    """A static check by hand: each Protocol parameter exists on NPREngine's method with the same
    kind (or a more permissive one), and optional there when it is optional in the Protocol."""
    wanted = inspect.signature(getattr(RolloutBackend, name)).parameters
    have = inspect.signature(getattr(NPREngine, name)).parameters
    for pname, p in wanted.items():
        assert pname in have, f"{name} lacks {pname}"
        q = have[pname]
        assert q.kind == p.kind or (q.kind == q.POSITIONAL_OR_KEYWORD and p.kind != p.VAR_POSITIONAL)
        assert p.default is p.empty or q.default is not q.empty, f"{name}({pname}) must be optional"
    extra = [q for q in have.values() if q.name not in wanted]
    assert all(q.default is not q.empty for q in extra), f"{name} has required parameters the Protocol lacks"


def test_memory_hooks_are_safe_no_ops():
    engine, params = make_engine(), SamplingParams(n=2, max_new_tokens=12, seed=4)
    before = engine.generate([PROMPT, PROMPT[:3]], params, seeds=[1, 2])
    weights = {n: t.clone() for n, t in engine.weights.tensors.items()}
    engine.release_memory()
    engine.release_memory()  # twice is harmless
    engine.resume_memory()
    engine.resume_memory()
    assert all(torch.equal(t, engine.weights.tensors[n]) for n, t in weights.items())
    assert ids(engine.generate([PROMPT, PROMPT[:3]], params, seeds=[1, 2])) == ids(before)
    engine.release_memory()  # generation without a resume also works: the hooks do nothing here
    assert ids(engine.generate([PROMPT, PROMPT[:3]], params, seeds=[1, 2])) == ids(before)
    assert engine.pool.free == engine.pool.num_slots


# ---------------------------------------------------------------- prompt validation
@pytest.mark.parametrize("bad,why", [
    ("hello", "got str"),
    (None, "got NoneType"),
    (torch.tensor([1.0, 2.0]), "float32"),
    (torch.tensor([[1, 2], [3, 4]]), "2-D"),
    (np.array([1.5, 2.0]), "float64"),
    ([[1, 2], [3]], "item 0 is list"),
    ([1, 2.5, 3], "item 1 is float"),
    ([1, True], "item 1 is bool"),
    ([1, None], "item 1 is NoneType"),
    ([], "empty"),
    ([1, 10 ** 9], "outside"),
    ([-1, 3], "outside"),
])
def test_bad_prompts_raise_value_error_naming_the_prompt(engine, bad, why):
    with pytest.raises(ValueError, match=r"prompt 1\b") as err:
        engine.generate([PROMPT, bad], SamplingParams(max_new_tokens=4))
    assert why in str(err.value)
    assert engine.pool.free == engine.pool.num_slots and engine.pool.reserved == 0


def test_prompts_must_be_a_list(engine):
    with pytest.raises(ValueError, match="prompts must be a list"):
        engine.generate(None, SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize("as_type", [tuple, torch.tensor, lambda p: torch.tensor(p, dtype=torch.int32),
                                     np.array, lambda p: [np.int64(x) for x in p]],
                         ids=["tuple", "long-tensor", "int-tensor", "numpy", "numpy-ints"])
def test_integer_arrays_and_tuples_are_accepted_as_lists(engine, as_type):
    params = SamplingParams(n=2, max_new_tokens=10, seed=3)
    expected = engine.generate([PROMPT], params)
    got = engine.generate([as_type(PROMPT)], params)
    assert ids(got) == ids(expected)
    assert all(type(t) is int for r in got for t in r.token_ids)


# ---------------------------------------------------------------- vocabulary and module hygiene
def test_from_hf_takes_its_vocabulary_from_load_vocab(tmp_path, qwen):
    from megatron_npr.checkpoint.tiny import TinyQwen3, write_random_qwen3
    from megatron_npr.data.tokenizer import load_vocab

    folder = write_random_qwen3(tmp_path / "m", qwen[0], TinyQwen3(hidden_size=16, num_hidden_layers=1,
                                                                   num_attention_heads=2, num_key_value_heads=1,
                                                                   head_dim=8, intermediate_size=32))
    engine, vocab = NPREngine.from_hf(folder, kv_slots=256), load_vocab(folder)
    assert engine.vocab.tags == vocab.tags and engine.vocab.eos_ids == vocab.eos_ids
    assert all(engine.vocab.label_ids(j) == vocab.label_ids(j) for j in (1, 2, 8))
    rollout = engine.generate([vocab.prompt_ids("1+1?", "")], SamplingParams(max_new_tokens=3))[0]
    assert rollout.finish_reason in ("stop", "length")


def test_rollout_modules_import_no_private_names():
    """The scheduler/engine seam stays public: no `from .x import _name` inside the package."""
    for path in Path(rollout_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_scheduler_runs_behind_any_model():
    """Another backend drives RolloutScheduler through its public methods alone: here the
    'model' is fixed logits favouring token 7, and every KV slot comes back."""
    from megatron_npr.rollout import SlotPool
    from megatron_npr.rollout.scheduler import DecodeVocab, RolloutScheduler

    pool, logits = SlotPool(64), torch.zeros(128).index_fill_(0, torch.tensor([7]), 1.0)
    sched = RolloutScheduler(SamplingParams(n=2, max_new_tokens=5, temperature=0),
                             DecodeVocab(TAGS, frozenset([EOS]), lambda j: [50 + j]), pool)
    prompts = [[1, 2, 3], [4, 5]]
    for i, prompt in enumerate(prompts):
        assert sched.try_reserve(len(prompt))
        sched.admit(i, prompt, pool.allocate(len(prompt)), logits)
    widths = []
    while sched.busy:
        sched.retire_finished()
        step = sched.next_step()
        if step is not None:
            widths.append(step.visible_slots.shape)
            sched.advance(step, logits.expand(len(step.tokens), -1))
        sched.retire_finished()
    rollouts = sched.rollouts(len(prompts))
    assert [r.token_ids for r in rollouts] == [p + [7] * 5 for p in prompts for _ in range(2)]
    assert all(r.finish_reason == "length" and r.positions == list(range(len(r.token_ids))) for r in rollouts)
    assert widths[0] == (4, 4) and len(widths) == 4  # 4 streams; the 5th token is never fed
    pool.assert_empty()
