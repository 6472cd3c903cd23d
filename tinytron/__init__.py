"""Tinytron: a minimal, hackable, correct pre-training stack for GPT-style language models."""

__version__ = "0.1.0"
