"""Engines for tests/test_rollout_group.py, built in spawned engine processes (so: importable
module-level factories). Each is the real NPREngine on a tiny random Qwen3, or one that fails
the way a real engine rank can: dies, hangs, raises, or never starts."""
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # model_fixtures, npr_reference

import torch  # noqa: E402

from megatron_npr.rollout import NPREngine  # noqa: E402

EOS = 99
PROMPTS = [[5, 6, 7, 8, 9, 10], [5, 6, 7], [6, 7, 8, 9, 10], [5, 6, 7, 8, 9], [7, 8, 9, 10], [11, 12]]


class DigestEngine(NPREngine):
    """NPREngine that can say what it holds, bitwise (the group forwards any method by name)."""

    def weight_digest(self) -> dict[str, str]:
        return digest(self.weights.tensors)


def model(seed: int = 0):
    from model_fixtures import tiny_hf_model
    return tiny_hf_model(layers=1, seed=seed)


def tiny_engine(seed: int = 0, kv_slots: int = 4096) -> DigestEngine:
    from npr_reference import TAGS
    hf = model(seed)
    return DigestEngine(hf.config.to_dict(), hf.state_dict(), tags=TAGS, eos_ids=[EOS], label_ids=lambda j: [50 + j],
                        kv_slots=kv_slots)


class Dying(DigestEngine):
    def generate(self, *args, **kwargs):
        os._exit(3)


class Hanging(DigestEngine):
    def generate(self, *args, **kwargs):
        time.sleep(3600)


class Ignoring(DigestEngine):
    def update_weights(self, named_tensors):
        return 0


class Raising(DigestEngine):
    def generate(self, *args, **kwargs):
        raise ValueError("prompt 3 is too long for this engine")


def dying_engine():
    return _patched(Dying)


def hanging_engine():
    return _patched(Hanging)


def raising_engine():
    return _patched(Raising)


def ignoring_engine():
    return _patched(Ignoring)


def never_starts():
    raise RuntimeError("CUDA out of memory while loading the engine (simulated)")


def _patched(cls):
    engine = tiny_engine()
    engine.__class__ = cls
    return engine


def mixed_engines(folder: str):
    """Engine rank 2 is SGLang (tests/fake_sglang.py's engine behind SGLangBackend, receiving as
    SGLang's scheduler does), the others the torch engine: one sender must drive both."""
    import multiprocessing

    if multiprocessing.current_process().name != "npr-engine-2":
        return tiny_engine()
    from fake_sglang import FakeEngine
    from npr_reference import TAGS

    from megatron_npr.rollout.scheduler import DecodeVocab
    from megatron_npr.rollout.sglang_backend import SGLangBackend

    class DigestSGLang(SGLangBackend):
        def weight_digest(self):
            return digest(self.engine.weights.tensors)

    fake = FakeEngine(model_path=folder, enable_deterministic_inference=True, skip_tokenizer_init=True,
                      sampling_defaults="openai")
    return DigestSGLang(fake, DecodeVocab(TAGS, frozenset([EOS]), lambda j: [50 + j]))


def digest(tensors) -> dict[str, str]:
    return {name: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, t in sorted(tensors.items())}
