"""Interop with other frameworks: Hugging Face `transformers` export, import and init."""

from tinytron.interop.hf import export_hf, init_from_hf, load_hf, to_hf_model

__all__ = ["export_hf", "init_from_hf", "load_hf", "to_hf_model"]
