"""megatron-npr: a Megatron-Core trainer for Native Parallel Reasoner models."""

__version__ = "0.1.0"
