"""tools/convert_hf.py: round trips, verification, NPR tokens, and bad input leaving nothing behind."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_npr.checkpoint import CheckpointError
from megatron_npr.checkpoint import convert
from megatron_npr.models import ModelConfigError
from megatron_npr.topology import NPR_TAGS
from harness import load_tool
from model_fixtures import tiny_hf_model

TOOL = Path(__file__).resolve().parent.parent / "tools" / "convert_hf.py"


def run_tool(*args, timeout=600):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def _nothing_left(out: Path):
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """tied/untied tiny models -> dist checkpoints at TP2 x PP2 -> back to HF (via the CLI)."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for tied in (False, True):
        hf, ckpt, back = root / f"hf{int(tied)}", root / f"ckpt{int(tied)}", root / f"back{int(tied)}"
        tiny_hf_model(tied=tied).save_pretrained(hf)
        for args in (("hf-to-mcore", "--hf-dir", hf, "--out", ckpt, "--tp", 2, "--pp", 2),
                     ("mcore-to-hf", "--ckpt", ckpt, "--out", back)):
            res = run_tool(*args)
            assert res.returncode == 0, res.stderr[-3000:]
        out[tied] = (hf, ckpt, back)
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_through_tp2_pp2_is_bitwise(converted, tied):
    hf, _, back = converted[tied]
    a, b = _weights(hf), _weights(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import Qwen3ForCausalLM
    reloaded = Qwen3ForCausalLM.from_pretrained(back)  # an ordinary HF folder again
    assert reloaded.config.tie_word_embeddings == tied


@pytest.mark.multirank
def test_verify_passes_on_the_source_and_fails_on_another_model(converted):
    hf_untied, ckpt_untied, _ = converted[False]
    hf_tied, _, _ = converted[True]
    good = run_tool("verify", "--hf-dir", hf_untied, "--ckpt", ckpt_untied)
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads(good.stdout.strip().splitlines()[-1])["max_abs_diff"] <= 1e-5
    bad = run_tool("verify", "--hf-dir", hf_tied, "--ckpt", ckpt_untied)
    assert bad.returncode == 1 and json.loads(bad.stdout.strip().splitlines()[-1])["max_abs_diff"] > 1e-2


def _cli_main():
    return load_tool("convert_hf").main


@pytest.mark.parametrize("problem,error,message", [
    ("no_config", CheckpointError, "config.json not found"),
    ("llama", CheckpointError, "only Qwen3 dense models"),
    ("corrupt", CheckpointError, "model.safetensors"),
    ("tp_kv", ModelConfigError, "tp=4 does not divide num_key_value_heads=2"),
])
def test_bad_input_names_the_problem_and_leaves_no_output(tmp_path, capsys, problem, error, message):
    hf = tmp_path / "hf"
    tiny_hf_model().save_pretrained(hf)
    tp = 1
    if problem == "no_config":
        (hf / "config.json").unlink()
    elif problem == "llama":
        cfg = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "llama",
                                                    "architectures": ["LlamaForCausalLM"]}))
    elif problem == "corrupt":
        data = (hf / "model.safetensors").read_bytes()
        (hf / "model.safetensors").write_bytes(data[:len(data) // 2])
    else:
        tp = 4
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        convert.hf_to_mcore(hf, out, tp=tp)
    assert _nothing_left(out)
    capsys.readouterr()  # drop what saving the fixture printed
    assert _cli_main()(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(out), "--tp", str(tp)]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and _nothing_left(out)


def test_a_non_empty_output_folder_is_refused_in_one_line(converted, capsys):
    hf, ckpt, _ = converted[False]
    for command, source in (("hf-to-mcore", ["--hf-dir", hf]), ("mcore-to-hf", ["--ckpt", ckpt])):
        out = hf.parent / f"taken-{command}"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        if command == "hf-to-mcore":  # refused in this process, before any worker starts
            capsys.readouterr()
            assert _cli_main()([command, *map(str, source), "--out", str(out)]) == 1
            err = capsys.readouterr().err.strip()
        else:  # loading a checkpoint initialises torch.distributed: keep that out of the test process
            res = run_tool(command, *source, "--out", out)
            assert res.returncode == 1
            err = res.stderr.strip()
        assert "already exists and is not an empty folder" in err and len(err.splitlines()) == 1, err
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_failure_inside_a_worker_leaves_no_output(tmp_path):
    hf = tmp_path / "hf"
    tiny_hf_model().save_pretrained(hf)
    weights = _weights(hf)
    weights["model.layers.1.self_attn.q_proj.weight"] = weights["model.layers.1.self_attn.q_proj.weight"][:-16]
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="q_proj"):
        convert.hf_to_mcore(hf, out)
    assert _nothing_left(out)


def _tiny_tokenizer(folder: Path, vocab_size: int):
    """A small byte-level BPE tokenizer that knows the tag names' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["guideline plan step takeaway /guideline /plan /step /takeaway compute the answer"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return len(tok.get_vocab())


@pytest.mark.parametrize("spare_rows", [16, 0])
def test_add_npr_tokens_initialises_tag_rows_from_their_names(tmp_path, spare_rows):
    hf = tmp_path / "hf"
    hf.mkdir()
    n = _tiny_tokenizer(hf, 300)
    model = tiny_hf_model(vocab=n + spare_rows)
    model.save_pretrained(hf)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    convert.hf_to_mcore(hf, ckpt, add_npr_tokens=True)
    res = run_tool("mcore-to-hf", "--ckpt", ckpt, "--out", back)
    assert res.returncode == 0, res.stderr[-2000:]
    from megatron_npr.data.tokenizer import load_tokenizer
    tokenizer, tags = load_tokenizer(back)
    assert tags.ids == tuple(range(n, n + 8))  # the tags follow the base vocabulary
    config = json.loads((back / "config.json").read_text())
    assert config["vocab_size"] == (n + spare_rows if spare_rows >= 8 else 384)  # grown to a multiple of 128
    old, new = model.state_dict(), _weights(back)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(new[name][:n], old[name][:n])
        for tag in NPR_TAGS:
            sub = tokenizer.encode(tag.strip("<>"), add_special_tokens=False)
            assert torch.allclose(new[name][tags[tag]], old[name][sub].mean(0), atol=1e-6), (name, tag)
