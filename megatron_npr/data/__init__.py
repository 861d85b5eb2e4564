"""Datasets, prompts and the tokenizer."""
