"""YAML configs into typed dataclasses: errors name the key, overrides work."""
from dataclasses import dataclass, field
from typing import Literal

import pytest

from megatron_npr.config import ConfigError, config_to_dict, load_config


@dataclass
class Optim:
    lr: float = 1e-6
    min_lr: float = 5e-7
    schedule: Literal["cosine", "constant"] = "cosine"

    def __post_init__(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} > lr {self.lr}")


@dataclass
class Run:
    name: str
    steps: int = 10
    tp: int = 1
    seqs: list[int] = field(default_factory=lambda: [8192])
    tokenizer: str | None = None
    optim: Optim = field(default_factory=Optim)


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_file_and_overrides_build_typed_config(tmp_path):
    path = write(tmp_path, "name: tiny\nsteps: 3\nseqs: [1024, 2048]\noptim:\n  lr: 1e-5\n  schedule: constant\n")
    cfg = load_config(Run, path, ["optim.min_lr=1e-6", "tp=2", "tokenizer=/x"])
    assert cfg == Run("tiny", 3, 2, [1024, 2048], "/x", Optim(1e-5, 1e-6, "constant"))
    assert isinstance(cfg.optim.lr, float) and config_to_dict(cfg)["optim"]["lr"] == 1e-5
    assert load_config(Run, None, ["name=x"]).optim == Optim()


@pytest.mark.parametrize("text,overrides,message", [
    ("name: a\noptim:\n  lrr: 1\n", [], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("name: a\nsteps: three\n", [], "'steps' must be int, got 'three'"),
    ("name: a\nsteps: true\n", [], "'steps' must be int, got True"),
    ("name: a\noptim:\n  schedule: linear\n", [], "'optim.schedule' must be one of ['cosine', 'constant']"),
    ("name: a\nseqs: [1, x]\n", [], "'seqs[1]' must be int"),
    ("steps: 1\n", [], "missing required key 'name'"),
    ("name: a\noptim:\n  lr: 1e-7\n", [], "optim: min_lr 5e-07 > lr 1e-07"),
    ("name: a\n", ["optim.lr"], "expected key=value"),
    ("name: a\n", ["name.x=1"], "'name' is not a section"),
    ("- a\n- b\n", [], "top level must be a mapping"),
    ("name: [unclosed\n", [], "invalid YAML"),
])
def test_errors_name_the_file_and_key(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(Run, path, overrides)
    assert message in str(err.value) and (str(path) in str(err.value) or "override" in str(err.value))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(Run, tmp_path / "nope.yaml")


def test_a_section_keeps_its_parents_default_for_unset_keys(tmp_path):
    """`sampling:` of a rejection config defaults to sequential decoding with 4 draws a round;
    setting one key keeps the others (a plain SamplingParams would say parallel=True, n=1)."""
    from megatron_npr.training.rejection import RejectionConfig
    path = tmp_path / "rs.yaml"
    path.write_text("engine: {hf_dir: m}\ndata: {path: d.jsonl}\nout: o.jsonl\nsampling: {temperature: 0.5}\n")
    s = load_config(RejectionConfig, path).sampling
    assert (s.temperature, s.parallel, s.n) == (0.5, False, 4)
    s = load_config(RejectionConfig, path, ["sampling.parallel=true"]).sampling
    assert (s.temperature, s.parallel, s.n) == (0.5, True, 4)
    with pytest.raises(ConfigError, match="unknown key 'sampling.temprature'"):
        load_config(RejectionConfig, path, ["sampling.temprature=1"])
