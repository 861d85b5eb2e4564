"""`npr rl`: the RL loop of stage 1 (DAPO) and stage 3 (PAPO), on one screen in `run_rl`:

    prompts -> generate (n per prompt) -> rewards -> select -> advantages -> samples and
    microbatches -> trainer step(s) -> weight sync -> metrics -> checkpoint

The algorithm is looked up by name (`rl.algorithms.ALGORITHMS`) and asked for its decisions
(what to drop, how to score, what to keep, how to normalise, which loss); where the engine runs
is the `RolloutManager`'s business (`rl.rollouts`). Every rank runs this same code on the same
global batch and trains its DP share.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import config_to_dict
from ..data.problems import Problem
from ..data.tokenizer import NPRVocab
from ..io import output_taken, write_json_atomic
from ..seeding import problem_seed, stream_seed
from ..training.checkpointing import crash_point, latest_step, step_dir_name
from ..training.preemption import StopRequest
from ..training.run_log import MetricsLogger, plot_curves, read_history
from ..training.trainer import MegatronTrainer, init_parallel
from .algorithms import ALGORITHMS, Algorithm
from .batch import build_batch, mismatch_metrics, with_old_logprobs
from .config import RLConfig
from .prompts import PromptStream, load_rl_problems
from .rollouts import RolloutManager, build_backend, engine_factory_of
from .step_log import Drawn, PhaseClock, is_logger, step_metrics, summary, write_rollout_dump

log = logging.getLogger(__name__)
CURVES = ("reward_mean", "accuracy", "npr_format_rate", "response_tokens", "mismatch_max", "grad_norm", "lr")


def run_rl(cfg: RLConfig, progress: bool = True, *, engine=None, grader=None, vocab: NPRVocab | None = None,
           engine_factory=None) -> dict:
    """The whole `npr rl` run, resumed from the newest checkpoint if there is one. `engine` /
    `grader` replace the configured ones (used on global rank 0 only), `vocab` the model's;
    `engine_factory` (picklable) builds each engine instead of the configured one (any placement)."""
    algo, rl = ALGORITHMS[cfg.rl.algorithm], cfg.rl
    with StopRequest.installed() as stop:  # a preemption signal: checkpoint at the end of the step, exit
        run = RLRun.start(cfg, engine, grader, vocab, progress, engine_factory)
        while run.step < rl.steps:
            step, clock = run.step + 1, PhaseClock()
            crash_point("generate", step)
            drawn, rounds = collect(run, algo, step, clock)          # prompts -> generate -> rewards -> select
            train = [d for d in drawn if d.trained]
            set_advantages(algo, train)                              # group-relative, with the algorithm's std
            run.rollouts.release_memory()                            # a colocated engine lends its memory
            update = {}
            if train:                                                # else nothing to learn from: step skipped
                crash_point("train", step)
                with clock("train"):
                    update = train_step(run, algo, train)            # samples -> microbatches -> update(s)
                crash_point("sync", step)
                with clock("sync"):
                    update |= run.rollouts.sync(run.trainer, run.rollouts.version + 1)  # weights -> engine
            run.step = step
            run.log(step_metrics(step, drawn, rounds, update, clock, run.vocab, cfg), drawn)
            if step == rl.steps or (rl.save_every and step % rl.save_every == 0):
                crash_point("save", step)
                run.save()
            if step < rl.steps and stop.agreed():                    # every rank stops at this step
                return run.stop_early()
    return run.finish()


def set_advantages(algo: Algorithm, train: list[Drawn]) -> None:
    rewards = torch.tensor([d.reward for d in train], dtype=torch.float64)
    groups = torch.tensor([d.group for d in train], dtype=torch.long)
    for d, a in zip(train, algo.advantages(rewards, groups).tolist()):
        d.advantage = a


# ---------------------------------------------------------------- the run's state
@dataclass
class RLRun:
    cfg: RLConfig
    vocab: NPRVocab
    stream: PromptStream
    trainer: MegatronTrainer
    rollouts: RolloutManager
    dp: tuple[int, int]  # (dp_rank, dp_size)
    skipped_problems: list[str] = field(default_factory=list)
    step: int = 0
    logger: MetricsLogger | None = None
    bar: object = None  # tqdm progress bar

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.rl.out_dir)

    @classmethod
    def start(cls, cfg: RLConfig, engine=None, grader=None, vocab: NPRVocab | None = None,
              progress: bool = True, engine_factory=None) -> RLRun:
        """Parallel state, problems, trainer (resumed), engine (given the trainer's weights)."""
        from tqdm import tqdm

        from ..checkpoint import read_hf_config
        from ..rewards import open_grader

        rl = cfg.rl
        if rl.updates_per_batch > 1 and ALGORITHMS[rl.algorithm].on_policy_loss:
            log.warning("%s with %d updates per batch: the updates after the first are off-policy, so the loss "
                        "falls back to the clipped one against log-probs recomputed before the first update",
                        rl.algorithm, rl.updates_per_batch)
        if rl.export_hf and output_taken(rl.export_hf):
            raise ValueError(f"rl.export_hf={rl.export_hf} already exists: remove it or name another folder "
                             "(checked before training, not after)")
        dp = init_parallel(cfg.parallel, rl.seed)
        vocab = vocab or cfg.model.vocab()
        vocab.check_fits(read_hf_config(cfg.model.hf_dir)["vocab_size"], cfg.model.hf_dir)
        problems, skipped = load_rl_problems(cfg.data, rl.missing_answer)
        trainer = MegatronTrainer.build(cfg.model, cfg.parallel, cfg.optim, rl.steps * rl.updates_per_batch, rl.seed,
                                        Path(rl.out_dir) / "checkpoints", keep_last=rl.keep_last)
        rollouts = RolloutManager(lambda: build_backend(cfg.rollout, engine_factory_of(cfg, engine, engine_factory)),
                                  lambda: grader if grader is not None else open_grader(cfg.grader, problems),
                                  bucket_bytes=cfg.rollout.bucket_mb << 20)
        run = cls(cfg, vocab, PromptStream(problems, rl.prompts_per_step, rl.seed), trainer, rollouts, dp, skipped)
        state = trainer.resume() or {}
        run.step = state.get("step", 0)
        if state:
            run.stream.load_state_dict(state["prompts"])
        run.rollouts.sync(trainer, state.get("weight_version", 0))  # the engine starts from the trainer's weights
        run.logger = MetricsLogger(run.out_dir, read_history(run.out_dir, run.step), enabled=is_logger(),
                                   scalar_prefix="rl/")
        run.bar = tqdm(total=rl.steps, initial=run.step, desc=f"rl {rl.algorithm}", unit="step",
                       disable=not (progress and is_logger()), dynamic_ncols=True)
        return run

    def log(self, metrics: dict, drawn: list[Drawn]) -> None:
        """metrics.jsonl and TensorBoard, the rollout dump, the progress bar."""
        metrics.setdefault("lr", self.trainer.optimizer.param_groups[0]["lr"])  # a skipped step has no update
        self.logger.log(metrics)
        if self.cfg.rl.dump_rollouts and is_logger():
            write_rollout_dump(self.out_dir, metrics["step"], drawn)
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                             mismatch=f"{metrics['mismatch_max']:.1e}")

    def save(self) -> Path:
        state = {"step": self.step, "prompts": self.stream.state_dict(), "weight_version": self.rollouts.version,
                 "config": config_to_dict(self.cfg)}  # torch's RNG state is saved by every checkpoint
        return self.trainer.save(self.step, state, tokenizer=self.vocab.tokenizer)

    def stop_early(self) -> dict:
        """A stop on request (preemption): checkpoint this step unless it was just saved, close the
        engines; the summary says where a restart resumes."""
        if latest_step(self.trainer.checkpoint_dir) != self.step:
            crash_point("save", self.step)
            self.save()
        self.bar.close()
        self.logger.close()
        self.rollouts.close()
        return {"preempted": True, "step": self.step, "steps": self.cfg.rl.steps,
                "checkpoint": str(self.trainer.checkpoint_dir / step_dir_name(self.step))}

    def finish(self) -> dict:
        self.bar.close()
        self.logger.close()
        self.rollouts.close()
        history = self.logger.history
        out = summary(history, self.cfg, self.skipped_problems, self.rollouts.version)
        if self.cfg.rl.export_hf:  # collective: every rank takes part in the gather
            out["export_hf"] = str(self.trainer.export_hf(self.cfg.rl.export_hf, self.vocab.tokenizer))
        if is_logger():
            keys = [k for k in CURVES if all(k in row for row in history)]
            plot_curves(history, self.out_dir / "curves.png", title=f"RL {self.cfg.rl.algorithm}", keys=keys)
            write_json_atomic(self.out_dir / "summary.json", out, sort_keys=False)
        return out


# ---------------------------------------------------------------- generate, score, select
def collect(run: RLRun, algo: Algorithm, step: int, clock: PhaseClock) -> tuple[list[Drawn], int]:
    """Generation rounds of `prompts_per_step` new prompts each, until `prompts_per_step` groups
    are selected (dynamic sampling) or `max_generation_rounds` (one round for an algorithm that
    keeps every group). Returns every rollout drawn, marked with what was decided, and the rounds."""
    cfg, rl = run.cfg, run.cfg.rl
    rounds = rl.max_generation_rounds if algo.dynamic_sampling else 1
    drawn: list[Drawn] = []
    kept_groups = 0
    for round_index in range(rounds):
        problems = run.stream.take()
        seeds = [problem_seed(stream_seed(rl.seed, step), p.id, round_index) for p in problems]
        with clock("generate"):
            prompts = [run.vocab.prompt_ids(p.question, cfg.data.instruction_text()) for p in problems]
            rollouts = run.rollouts.generate(prompts, cfg.sampling, seeds)
        with clock("reward"):
            batch = score(run, algo, problems, seeds, rollouts, round_index,
                          first_group=round_index * rl.prompts_per_step)
        for group in _selected_groups(batch):
            if kept_groups >= rl.prompts_per_step:  # a full batch already: DAPO trains exactly prompts_per_step
                for d in group:
                    d.trained, d.verdict = False, "surplus_group"
            kept_groups += 1
        drawn += batch
        if kept_groups >= rl.prompts_per_step:
            break
    if kept_groups < rl.prompts_per_step and algo.dynamic_sampling:
        log.warning("step %d: %d of %d groups informative after %d generation rounds; training on those",
                    step, kept_groups, rl.prompts_per_step, rounds)
    return drawn, round_index + 1


def score(run: RLRun, algo: Algorithm, problems: list[Problem], seeds: list[int], rollouts, round_index: int,
          first_group: int) -> list[Drawn]:
    """Drop (PAPO), grade, reward and select one round's rollouts (prompt-major, n per problem)."""
    cfg, n = run.cfg, run.cfg.sampling.n
    depth = cfg.sampling.max_depth
    drawn = [Drawn(problems[i // n], i % n, round_index, seeds[i // n], r, first_group + i // n)
             for i, r in enumerate(rollouts)]
    texts = [run.vocab.decode(r.token_ids[r.response_start:]) for r in rollouts]
    for d, ok in zip(drawn, run.rollouts.grade(texts, [d.problem.answer for d in drawn])):
        d.correct = ok  # every rollout is graded: accuracy counts dropped ones too
    for d, reason in zip(drawn, algo.drop_reasons(rollouts, run.vocab.tags, max_depth=depth)):
        d.verdict = reason
    kept = [i for i, d in enumerate(drawn) if d.verdict is None]
    rewards, reasons = algo.score([texts[i] for i in kept], [drawn[i].correct for i in kept],
                                  [len(drawn[i].response) for i in kept], max_new_tokens=cfg.sampling.max_new_tokens,
                                  overlong_buffer=cfg.rl.overlong_buffer, overlong_factor=cfg.rl.overlong_factor,
                                  max_depth=depth)
    for i, reward, reason in zip(kept, rewards, reasons):
        drawn[i].reward, drawn[i].format_reason = reward, reason
    if kept:
        selected = algo.select(torch.tensor(rewards, dtype=torch.float64), torch.tensor([drawn[i].group for i in kept]))
        for i, ok in zip(kept, selected.tolist()):
            drawn[i].trained, drawn[i].verdict = ok, None if ok else "uninformative_group"
    return drawn


def _selected_groups(drawn: list[Drawn]) -> list[list[Drawn]]:
    """The trained rollouts of each group that has any, in group order."""
    by_group: dict[int, list[Drawn]] = {}
    for d in drawn:
        if d.trained:
            by_group.setdefault(d.group, []).append(d)
    return list(by_group.values())


# ---------------------------------------------------------------- train
def train_step(run: RLRun, algo: Algorithm, train: list[Drawn]) -> dict:
    """Samples -> this rank's microbatches -> trainer log-probs (the mismatch, and the old
    log-probs of a multi-update loss) -> one optimizer step per mini-batch of groups."""
    rl, trainer = run.cfg.rl, run.trainer
    updates = min(rl.updates_per_batch, len({d.group for d in train}))
    minibatches = [build_batch([d.rollout for d in part], [d.advantage for d in part], run.vocab,
                               max_tokens=rl.max_tokens, micro_rows=rl.micro_rows, dp_rank=run.dp[0],
                               dp_size=run.dp[1]) for part in _split_by_group(train, updates)]
    before = [trainer.logprobs(mb.microbatches) for mb in minibatches]  # the policy before any update
    mismatch = mismatch_metrics(list(zip(minibatches, before)), run.vocab.tags, run.cfg.sampling.max_depth)
    if rl.updates_per_batch > 1 and algo.needs_old_logprobs(rl.updates_per_batch):
        inputs = [with_old_logprobs(mb.microbatches, lp) for mb, lp in zip(minibatches, before)]
    else:  # one update: the old policy is the engine's (its log-probs equal the trainer's: see mismatch)
        inputs = [mb.microbatches for mb in minibatches]
    loss_fn = algo.loss(rl.updates_per_batch, rl.clip())
    steps = [trainer.step(mbs, loss_fn) for mbs in inputs]
    out = {k: sum(s[k] for s in steps) / len(steps) for k in steps[0] if k not in ("lr", "skipped", "step_time_s")}
    return {**out, **mismatch, "lr": steps[-1]["lr"], "updates": len(steps),
            "optimizer_skipped": sum(bool(s["skipped"]) for s in steps),
            "train_tokens": sum(mb.real_tokens for mb in minibatches)}


def _split_by_group(train: list[Drawn], parts: int) -> list[list[Drawn]]:
    """`parts` mini-batches of whole groups, as even as possible, in group order."""
    order = sorted({d.group for d in train})
    part_of = {g: k * parts // len(order) for k, g in enumerate(order)}
    return [[d for d in train if part_of[d.group] == k] for k in range(parts)]
