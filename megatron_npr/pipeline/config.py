"""Configuration of `npr pipeline`: the whole recipe on a tiny model, stage by stage. The stage
sections hold the shared sections (`sampling:` is SamplingParams, `optim:` OptimSection), which the
pipeline hands to each stage as they are."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint.tiny import TinyQwen3
from ..rollout.sampling import SamplingParams
from ..sections import OptimSection


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
    """Training of the random model on canonical solutions (pipeline.bootstrap). Short rows (two
    samples each): under the dense branch mask, attention costs per token grow with the row."""
    steps: int = 800
    lr: float = 5e-3
    rows_per_step: int = 8
    max_tokens: int = 256


@dataclass
class SampleStage:
    """Rejection sampling (training.rejection); `sampling.n` draws per problem per round."""
    max_samples: int = 4  # K draws per problem
    batch_problems: int = 64
    # T=0.5: at 1.0 a tiny model's correct answers are mostly lucky guesses; parallel: a model
    # trained under the branch mask is sampled the way it was trained
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(
        n=4, temperature=0.5, max_new_tokens=192, parallel=True))


@dataclass
class SFTStage:
    """`npr sft` on the accepted samples (training.sft_config)."""
    epochs: float = 2.0
    global_batch_rows: int = 2
    max_tokens: int = 1024
    # higher rates lower held-out accuracy more (README: the main job)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-5, min_lr=3e-6, warmup_steps=5,
                                                                     weight_decay=0.0))


@dataclass
class EvalStage:
    """`npr eval` before and after (eval.runner); greedy: a deterministic before/after comparison."""
    measure_speedup: int = 16
    batch_problems: int = 100
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(n=1, temperature=0.0,
                                                                            max_new_tokens=192))


@dataclass
class PipelineConfig:
    out_dir: str = "runs/tiny"
    # "tiny": a 512-token tokenizer built into out_dir/tokenizer on the first run
    # (data.tiny_tokenizer); "qwen3": the bundled real Qwen3 one; else an HF tokenizer folder
    tokenizer: str = "tiny"
    model: TinyQwen3 = field(default_factory=lambda: TinyQwen3(num_hidden_layers=4, intermediate_size=256))
    synth: SynthSection = field(default_factory=SynthSection)
    bootstrap: BootstrapSection = field(default_factory=BootstrapSection)
    sample: SampleStage = field(default_factory=SampleStage)
    sft: SFTStage = field(default_factory=SFTStage)
    eval: EvalStage = field(default_factory=EvalStage)

    def __post_init__(self):
        if not str(self.tokenizer).strip():
            raise ValueError("tokenizer must be 'tiny', 'qwen3' or an HF tokenizer folder")
