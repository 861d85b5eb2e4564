"""SFT records -> samples: the engine-inserted mask agrees with the parallel engine itself, both
record forms load, and bad records are dropped and counted by reason (never fatal)."""
import json

import pytest
import torch
from npr_reference import TAGS, dsl

from megatron_npr.data.prompts import prompt_ids
from megatron_npr.data.synth import make_synth_dataset
from megatron_npr.topology import (
    PackSample,
    TopologyError,
    branch_label,
    build_layout,
    engine_inserted_mask,
    pack,
)
from megatron_npr.data.tokenizer import NPRVocab
from megatron_npr.training.sft_data import DropStats, SFTSample, load_sft_samples

G, g, P, p, S, s, K, k = TAGS.ids
LABEL = {j: [50 + j] for j in range(1, 9)}


def label_fn(tokenizer):
    return lambda j: tokenizer.encode(branch_label(j), add_special_tokens=False)


@pytest.fixture(scope="module")
def synth(qwen):
    """[(prompt ids, canonical response ids ending with <|im_end|>)] of synthetic solutions."""
    tokenizer, _ = qwen
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [(prompt_ids(prob.question, tokenizer, ""), tokenizer.encode(sol, add_special_tokens=False) + [end])
            for prob, sol in make_synth_dataset(6, (1, 4), 2, seed=11)]


def write_jsonl(path, records):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- engine_inserted_mask
def test_inserted_mask_equals_the_engines_forced_mask(qwen, synth):
    """Replay canonical solutions through the parallel engine (tiny random Qwen3 over the real
    vocabulary): the mask computed from the token ids alone is the engine's own forced_mask."""
    from model_fixtures import tiny_hf_model

    from megatron_npr.rollout import NPREngine, SamplingParams

    tokenizer, tags = qwen
    hf = tiny_hf_model(tied=True, layers=1, vocab=len(tokenizer))
    engine = NPREngine(hf.config.to_dict(), hf.state_dict(), tags=tags,
                       eos_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")], label_ids=label_fn(tokenizer),
                       kv_slots=4096)
    rollouts = engine.generate([pr for pr, _ in synth], SamplingParams(max_new_tokens=256),
                               replay=[resp for _, resp in synth])
    for (prompt, response), r in zip(synth, rollouts):
        assert r.finish_reason == "stop" and r.token_ids == prompt + response
        mask = engine_inserted_mask(r.token_ids, tags, r.response_start, label_fn(tokenizer))
        assert not mask[:r.response_start].any()
        assert mask[r.response_start:].tolist() == r.forced_mask
        assert sum(r.forced_mask) > 0
    # negative control: a mask that forgets the labels disagrees with the engine
    r = rollouts[0]
    no_labels = engine_inserted_mask(r.token_ids, tags, r.response_start, lambda j: [])
    assert no_labels[r.response_start:].tolist() != r.forced_mask


def test_inserted_mask_nested_and_rounds():
    """Nested blocks and several rounds, on the DSL vocabulary (labels are one token each)."""
    ids = [7, G, P, 1, p, P, 2, p, g, S, 51, G, P, 3, p, g, S, 51, 4, s, K, 5, k, s, S, 52, 6, s, K, 8, k,
           G, P, 9, p, g, S, 51, 10, s, K, 11, k]
    mask = engine_inserted_mask(ids, TAGS, 1, lambda j: LABEL[j], max_depth=2)
    assert [t for t, m in zip(ids, mask.tolist()) if m] == [S, 51, S, 51, K, S, 52, K, S, 51, K]
    with pytest.raises(TopologyError) as e:  # depth 2 is not allowed by default
        engine_inserted_mask(ids, TAGS, 1, lambda j: LABEL[j])
    assert e.value.reason == "nesting_too_deep"


@pytest.mark.parametrize("branches,index", [
    ([S, 52, 7, s, S, 52, 7, s], 10),  # branch 1 labelled "2:" where "1:" is expected
    ([S, 51, 7, s, S, 51, 7, s], 14),  # branch 2 labelled "1:"
    ([S, 51, 7, s, S, 7, s], 14),  # branch 2 without a label
], ids=["first", "second", "missing"])
def test_wrong_label_raises_branch_label(branches, index):
    ids = [7, G, P, 1, p, P, 2, p, g] + branches + [K, 7, k]
    with pytest.raises(TopologyError) as e:
        engine_inserted_mask(ids, TAGS, 1, lambda j: LABEL[j])
    assert e.value.reason == "branch_label" and e.value.index == index
    fixed = [7, G, P, 1, p, P, 2, p, g, S, 51, 7, s, S, 52, 7, s, K, 7, k]  # control: the right labels pass
    assert engine_inserted_mask(fixed, TAGS, 1, lambda j: LABEL[j]).sum() == 5


def test_label_may_end_the_branch():
    """`<step>1:</step>` is something the engine can produce (label, then `</step>` sampled)."""
    ids = dsl("a G P a p g") + [S, 51, s, K, 7, k]
    assert engine_inserted_mask(ids, TAGS, 1, lambda j: LABEL[j]).tolist() == [False] * 6 + [True, True, False,
                                                                                             True, False, False]
    with pytest.raises(TopologyError, match="branch_label"):
        engine_inserted_mask(ids, TAGS, 1, lambda j: [51, 60])  # the label would run past </step>


# ---------------------------------------------------------------- load_sft_samples
def test_token_and_text_forms_give_the_same_sample(tmp_path, qwen, synth):
    tokenizer, tags = qwen
    probs = make_synth_dataset(6, (1, 4), 2, seed=11)
    text = [prob.to_json() | {"solution": sol} for prob, sol in probs]
    tokens = [{"id": i, "prompt_ids": pr, "response_ids": resp, "response": "ignored"}
              for i, (pr, resp) in enumerate(synth)]
    a, da = load_sft_samples(write_jsonl(tmp_path / "text.jsonl", text), NPRVocab(tokenizer, tags), instruction="")
    b, db = load_sft_samples(write_jsonl(tmp_path / "tok.jsonl", tokens), NPRVocab(tokenizer, tags))
    assert da.kept == db.kept == 6 and da.dropped == db.dropped == 0
    for x, y, (prompt, response) in zip(a, b, synth):
        assert x.token_ids.tolist() == y.token_ids.tolist() == prompt + response
        assert torch.equal(x.loss_mask, y.loss_mask) and x.response_start == len(prompt)
        assert torch.equal(x.layout.position_ids, build_layout(x.token_ids, tags, len(prompt)).position_ids)
        inserted = engine_inserted_mask(x.token_ids, tags, len(prompt), label_fn(tokenizer))
        expected = (torch.arange(len(x.token_ids)) >= len(prompt)) & ~inserted
        assert torch.equal(x.loss_mask, expected)
    # negative control: another instruction changes the text form's prompt
    c, _ = load_sft_samples(tmp_path / "text.jsonl", NPRVocab(tokenizer, tags))
    assert c[0].token_ids.tolist() != a[0].token_ids.tolist()
    assert [x.line for x in a] == list(range(1, 7))
    assert len(pack(a + b, 512)) >= 1  # SFTSample is a PackSample


def test_text_form_canonicalises_and_appends_end_of_turn(tmp_path, qwen):
    tokenizer, tags = qwen
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    loose = ("<guideline>\n<plan>Compute A.</plan>\n<plan>Compute B.</plan>\n</guideline>\n"
             "<step>1. A = 2.</step>\n<step>2. B = 3.</step>\n<takeaway>5.</takeaway> \\boxed{5}")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "A+B?"}], tokenize=False,
                                           add_generation_prompt=True)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "response": loose},
                                             {"question": "A+B?", "response": loose + "<|im_end|>\n"}])
    samples, drops = load_sft_samples(path, NPRVocab(tokenizer, tags))
    assert drops.kept == 2
    first = samples[0]
    text = tokenizer.decode(first.token_ids[first.response_start:])
    assert "</guideline><step>1: A = 2.</step><step>2: B = 3.</step><takeaway>" in text
    assert first.token_ids.tolist()[:first.response_start] == tokenizer.encode(prompt, add_special_tokens=False)
    for x in samples:
        response = x.token_ids[x.response_start:]
        assert response[-1] == end and (response == end).sum() == 1
        assert x.loss_mask[-1]  # the model learns to stop


def test_forced_field_is_respected_and_checked(tmp_path, qwen, synth):
    tokenizer, tags = qwen
    prompt, response = synth[0]
    zeros = [0] * len(response)  # what a sequential rejection-sampling decode writes
    extra = list(zeros)
    extra[-1] = 1
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt_ids": prompt, "response_ids": response, "forced": zeros},
                                             {"prompt_ids": prompt, "response_ids": response, "forced": extra},
                                             {"prompt_ids": prompt, "response_ids": response, "forced": [0]}])
    samples, drops = load_sft_samples(path, NPRVocab(tokenizer, tags))
    assert drops.kept == 2 and drops.reasons == {"bad_record": 1} and "'forced'" in drops.examples[0]
    inserted = engine_inserted_mask(prompt + response, tags, len(prompt), label_fn(tokenizer))
    assert not samples[0].loss_mask[inserted].any()  # inserted tokens are never trained
    assert samples[0].loss_mask[-1] and not samples[1].loss_mask[-1]  # a flagged token is not trained either


def test_bad_records_are_dropped_and_counted(tmp_path, qwen, synth, caplog):
    tokenizer, tags = qwen
    prompt, response = synth[1]
    j = response.index(tags["<step>"])
    relabelled = response[:j + 1] + label_fn(tokenizer)(2) + response[j + 1 + len(label_fn(tokenizer)(1)):]
    unclosed = [t for t in response if t != tags["</takeaway>"]]
    records = [
        {"prompt_ids": prompt, "response_ids": response},  # ok
        "{not json\n",
        {"prompt_ids": prompt},
        {"prompt_ids": prompt, "response_ids": ["x"]},
        {"prompt_ids": prompt, "response_ids": [10 ** 9]},
        {"question": "q"},
        {"question": 3, "response": "x"},
        [1, 2],
        {"question": "q", "response": "   "},
        {"prompt_ids": prompt, "response_ids": []},
        {"prompt_ids": prompt, "response_ids": relabelled},  # step 1 labelled "2:"
        {"prompt_ids": prompt, "response_ids": unclosed},
        {"prompt_ids": prompt * 20, "response_ids": response},
        "\n",
        {"question": "q", "solution": "<guideline><plan>1: a</plan></guideline><step>1: b</step><takeaway>c"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with caplog.at_level("WARNING"):
        samples, drops = load_sft_samples(path, NPRVocab(tokenizer, tags), max_tokens=len(prompt) * 10)
    assert [x.line for x in samples] == [1]
    assert drops.kept == 1 and drops.dropped == 13
    assert drops.reasons == {"bad_json": 1, "bad_record": 6, "empty_response": 2, "branch_label": 1,
                             "unclosed_block": 2, "overlong": 1}
    assert drops.examples[0].startswith(f"{path}:2: bad_json:") and len(drops.examples) == 5
    assert f"{path}:3: bad_record: missing field 'response_ids'" == drops.examples[1]
    assert sum("dropped (" in r.getMessage() for r in caplog.records) == 13
    assert any(f"{path}:11: dropped (branch_label)" in r.getMessage() for r in caplog.records)
    summary = drops.summary()
    assert summary.startswith("kept 1, dropped 13 (bad_record 6") and "branch_label 1" in summary
    assert json.loads(json.dumps(drops.to_json()))["reasons"]["overlong"] == 1
    # negative control: the same records without the defects all load
    _, clean = load_sft_samples(write_jsonl(tmp_path / "ok.jsonl", [records[0]] * 3), NPRVocab(tokenizer, tags))
    assert clean.kept == 3 and clean.dropped == 0 and clean.summary() == "kept 3, dropped 0"


def test_missing_file_is_an_error(tmp_path, qwen):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_sft_samples(tmp_path / "nope.jsonl", NPRVocab(*qwen))


def test_sft_sample_and_drop_stats_types():
    assert issubclass(SFTSample, PackSample)  # pack() takes it as it is
    stats = DropStats()
    for i in range(8):
        stats.add(f"f:{i}", "bad_json", "m")
    assert stats.dropped == 8 and len(stats.examples) == 5
