import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    # Triton builds its own library functions (tl.zeros, tl.max, ...) for the interpreter only if
    # TRITON_INTERPRET is set when triton is first imported, and transformers imports it early.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Timing on shared 2-core machines is noisy: no per-example deadlines.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
    config.addinivalue_line("markers", "multirank: launches torchrun with several CPU ranks (slow; few)")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped elsewhere")


@pytest.fixture(scope="module")
def megatron():
    """Megatron parallel state for in-process tests (TP=PP=1, gloo on CPU)."""
    from megatron_npr.distributed import destroy_distributed, init_distributed, pop_cpu_device_mode
    init_distributed(1, 1)
    yield
    destroy_distributed()
    pop_cpu_device_mode()  # later test modules run without the CPU shim's torch-function hook


@pytest.fixture(scope="session")
def qwen():
    """The real Qwen3 tokenizer with the NPR tags: (tokenizer, TagIds)."""
    from megatron_npr.data.tokenizer import load_tokenizer
    return load_tokenizer()


@pytest.fixture(scope="session")
def vocab(qwen):
    """The same tokenizer as one NPRVocab (what every stage takes)."""
    from megatron_npr.data.tokenizer import NPRVocab
    return NPRVocab(*qwen)
