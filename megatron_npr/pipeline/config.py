"""Configuration of `npr pipeline`: the three stages on a tiny model. The stage sections hold the
shared sections (`sampling:` is SamplingParams, `optim:` OptimSection), which the pipeline hands to
each stage as they are."""
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
    """Training of the random model (pipeline.bootstrap.bootstrap_samples): `causal_npr` of the
    solutions in the NPR format trained causally, `parallel_npr` in the NPR format under the branch
    mask, the rest plain chains trained causally; so a sequential decode follows the format only
    sometimes (what stage 1 starts from). Short rows (two samples each): the dense mask costs per
    row length."""
    steps: int = 800
    lr: float = 5e-3
    rows_per_step: int = 8
    max_tokens: int = 256
    causal_npr: float = 0.25
    parallel_npr: float = 0.15

    def __post_init__(self):
        if min(self.causal_npr, self.parallel_npr) < 0 or self.causal_npr + self.parallel_npr > 1:
            raise ValueError(f"causal_npr and parallel_npr must be >= 0 with a sum <= 1, got "
                             f"{self.causal_npr} and {self.parallel_npr}")


def _rl_optim(lr: float) -> OptimSection:
    return OptimSection(lr=lr, min_lr=lr, schedule="constant", weight_decay=0.0, clip_grad=1.0)


@dataclass
class RLStage:
    """An `npr rl` run (rl.config) on the sampling set's problems; `steps: 0` skips the stage.
    Decoding (sequential or parallel) is the algorithm's."""
    steps: int = 12
    prompts_per_step: int = 8
    max_generation_rounds: int = 3  # DAPO's dynamic sampling
    overlong_buffer: int = 0
    max_tokens: int = 512  # packed row length
    seed: int = 1234
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(n=8, temperature=1.0,
                                                                            max_new_tokens=192))
    optim: OptimSection = field(default_factory=lambda: _rl_optim(1e-4))

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclass
class SampleStage:
    """Rejection sampling (training.rejection); `sampling.n` draws per problem per round."""
    max_samples: int = 4  # K draws per problem
    batch_problems: int = 64
    # T=0.5: at 1.0 a tiny model's correct answers are mostly lucky guesses; sequential: the
    # stage-1 model was trained causally, and the accepted samples teach SFT the branch mask
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(
        n=4, temperature=0.5, max_new_tokens=192, parallel=False))


@dataclass
class SFTStage:
    """`npr sft` on the accepted samples (training.sft_config)."""
    epochs: float = 2.0
    global_batch_rows: int = 2
    max_tokens: int = 1024
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-4, min_lr=3e-5, warmup_steps=5,
                                                                     weight_decay=0.0))


@dataclass
class EvalStage:
    """`npr eval` of every stage's model (eval.runner), decoding as that stage does; sampled at
    T=1, the policy the RL stages train (seeded: the same model gives the same numbers)."""
    measure_speedup: int = 16
    batch_problems: int = 100
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(n=2, temperature=1.0,
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
    dapo: RLStage = field(default_factory=lambda: RLStage(steps=12, prompts_per_step=16, optim=_rl_optim(2e-4)))
    sft: SFTStage = field(default_factory=SFTStage)
    papo: RLStage = field(default_factory=lambda: RLStage(steps=16, optim=_rl_optim(5e-5)))
    eval: EvalStage = field(default_factory=EvalStage)

    def __post_init__(self):
        if not str(self.tokenizer).strip():
            raise ValueError("tokenizer must be 'tiny', 'qwen3' or an HF tokenizer folder")
