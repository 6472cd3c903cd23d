"""Model weights from outside a run: a finished Trainer checkpoint (read whole, for tinytron-export
and tinytron-generate) and a Hugging Face folder (copied into a possibly expert-parallel model, for
--init_from_hf). The conversions themselves live in tinytron.interop.hf, which knows nothing of
training; this module needs `transformers` (import it lazily from training code)."""

import dataclasses
import os

import torch

from tinytron.interop.hf import is_hf_dir, read_hf_state
from tinytron.model import GPT, ModelConfig
from tinytron.training import checkpoint as ckpt
from tinytron.training.config import Config


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """A Trainer checkpoint -> (full fp32 state dict, ModelConfig, meta). `path` is a step folder,
    a run folder (its newest complete checkpoint) or a model.pt next to a meta.pt."""
    if not os.path.exists(path):
        raise ValueError(f"--checkpoint {path} does not exist")
    if is_hf_dir(path):
        raise ValueError(f"--checkpoint {path} is a Hugging Face folder, not a Tinytron checkpoint")
    if os.path.isfile(path):   # a model.pt (the older format) next to its meta.pt
        step, model_file = os.path.dirname(path), path
    else:
        step, model_file = ckpt.find_latest(path), None
        if step is None:
            raise ValueError(f"--checkpoint {path}: no complete checkpoint (a step folder with a "
                             f"{ckpt.COMPLETE} file, or a run folder holding checkpoints/step_*)")
    meta_file = os.path.join(step, "meta.pt")
    if not os.path.isfile(meta_file):
        raise ValueError(f"--checkpoint {path}: {meta_file} is missing")
    try:
        meta = torch.load(meta_file, map_location="cpu", weights_only=True)
        state = (torch.load(model_file, map_location="cpu", weights_only=True) if model_file
                 else ckpt.read_model_state(step))
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"--checkpoint {path}: unreadable file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(meta, dict) or "model" not in meta.get("config", {}):
        raise ValueError(f"--checkpoint {path}: {meta_file} has no config['model']")
    config = Config.from_dict({"model": meta["config"]["model"]}).model
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(meta["config"]["model"]) - known)
    if unknown:
        raise ValueError(f"--checkpoint {path}: model config field {unknown[0]} is unknown to this Tinytron")
    return state, config, meta


def run_tokenizer(meta: dict) -> str | None:
    """The --tokenizer the checkpoint's run was trained with (from its meta.pt), or None."""
    return meta.get("config", {}).get("data", {}).get("tokenizer") or None


def init_from_hf(model: GPT, hf_dir: str) -> None:
    """Copy the weights of a Llama / Mixtral folder into `model` in place (copy_, so parameters that
    are views into flat buffers stay views). Under expert parallelism call it after
    `apply_expert_parallel`: each rank then copies its own experts' slice. The architecture in
    config.json must equal model.config's."""
    state = read_hf_state(hf_dir, model.config)
    try:
        ckpt.load_full_model_state_dict(model, state, hf_dir)
    except ckpt.CheckpointError as e:
        raise ValueError(str(e)) from None
