"""Configuration of `npr pipeline`: the whole recipe on a tiny model, stage by stage."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint.tiny import TinyQwen3


@dataclass
class SynthSection:
    bootstrap: int = 3000  # problems with canonical solutions that bootstrap the random model
    sample: int = 400  # problems for rejection sampling
    eval: int = 200  # held-out problems (no question shared with the two sets above)
    parts: list[int] = field(default_factory=lambda: [2, 3])  # min and max independent sub-sums
    digits: int = 1
    seed: int = 0

    def __post_init__(self):
        if len(self.parts) != 2 or not 1 <= self.parts[0] <= self.parts[1]:
            raise ValueError(f"parts must be [min, max] with 1 <= min <= max, got {self.parts}")
        if min(self.bootstrap, self.sample, self.eval) < 1 or self.digits < 1:
            raise ValueError("bootstrap, sample, eval and digits must be >= 1")


@dataclass
class BootstrapSection:
    steps: int = 300
    lr: float = 3e-3
    rows_per_step: int = 8
    max_tokens: int = 1024


@dataclass
class SampleSection:
    max_samples: int = 4  # K draws per problem
    samples_per_round: int = 4
    temperature: float = 0.5  # at 1.0 a tiny model's correct answers are mostly lucky guesses
    max_new_tokens: int = 192
    parallel: bool = True  # a model trained under the branch mask is sampled the way it was trained
    batch_problems: int = 64


@dataclass
class StageSFTSection:
    epochs: float = 2.0
    lr: float = 3e-5  # higher rates lower held-out accuracy more (README: the main job)
    min_lr: float = 3e-6
    warmup_steps: int = 5
    weight_decay: float = 0.0
    global_batch_rows: int = 2
    max_tokens: int = 1024


@dataclass
class EvalSection:
    n: int = 1
    temperature: float = 0.0  # greedy: a deterministic before/after comparison
    max_new_tokens: int = 192
    measure_speedup: int = 16
    batch_problems: int = 100


@dataclass
class PipelineConfig:
    out_dir: str = "runs/tiny"
    tokenizer: str | None = None  # default: the bundled Qwen3 tokenizer
    model: TinyQwen3 = field(default_factory=lambda: TinyQwen3(num_hidden_layers=4, intermediate_size=256))
    synth: SynthSection = field(default_factory=SynthSection)
    bootstrap: BootstrapSection = field(default_factory=BootstrapSection)
    sample: SampleSection = field(default_factory=SampleSection)
    sft: StageSFTSection = field(default_factory=StageSFTSection)
    eval: EvalSection = field(default_factory=EvalSection)
