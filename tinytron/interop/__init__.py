"""Interop with other frameworks: Hugging Face `transformers` export, import and init."""

from tinytron.interop.hf import export_hf, load_hf, read_hf_state, to_hf_model

__all__ = ["export_hf", "load_hf", "read_hf_state", "to_hf_model"]
