"""Command-line flags, generated from the config dataclasses (one flag per field, same default)."""

import argparse
import dataclasses
import difflib
import re
import typing

from tinytron.distributed.abort import claim_bad_input_report
from tinytron.model.config import ModelConfig
from tinytron.training.config import SECTIONS, Config

_MODEL_HELP = {
    "block_size": f"maximum sequence length (None: the larger of {ModelConfig.block_size} and --seq_len)",
    "vocab_size": "vocabulary size (>= the tokenizer's)",
    "num_layer": "transformer blocks", "num_attention_heads": "query heads",
    "num_key_value_heads": "key/value heads (GQA; = heads for MHA)", "hidden_size": "model width",
    "intermediate_size": "SwiGLU hidden width", "dropout": "dropout probability",
    "tied_lm_head": "share the embedding and the output head", "rope_theta": "RoPE base",
    "norm_eps": "RMSNorm epsilon", "init_std": "std of the normal init",
    "use_moe": "Mixture-of-Experts MLPs", "num_experts": "experts per MoE layer",
    "num_experts_per_tok": "experts per token (top-k)", "moe_intermediate_size": "expert hidden width",
    "moe_router_softmax_before_topk": "softmax over all experts, then top-k and renormalise",
    "moe_aux_loss_coeff": "load-balancing loss coefficient", "moe_z_loss_coeff": "router z-loss coefficient",
}


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, typ) -> None:
    meta, flag = dict(f.metadata), f"--{f.name}"
    meta.pop("bound", None)  # checked by validate_config
    help_text = meta.pop("help", _MODEL_HELP.get(f.name, ""))
    default = None if f.name == "block_size" else f.default  # None: set from --seq_len by config_from_args
    if typ is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
    elif typing.get_origin(typ) is tuple:
        parser.add_argument(flag, type=typing.get_args(typ)[0], default=default, help=help_text, **meta)
    else:
        parser.add_argument(flag, type=typ, default=default, help=help_text, **meta)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Each flag's default at the end of its help, once (not where the help states it already)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if "(default" in text or "%(default)" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class FlagParser(argparse.ArgumentParser):
    """argparse with no prefix matching (`--max_step` is not `--max_steps`: a typo must not pass
    silently), negative numbers in any notation as values (`--max_lr -1e-3`), each default in
    --help, and errors in one line, like every other bad input (`[tinytron] error: ...`, exit 2),
    that suggest the nearest flag for an unknown one. Commands report their own bad input with
    `parser.error(message)`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, allow_abbrev=False, **kwargs)
        # argparse takes only -5 and -.5 for negative numbers, so `--max_lr -1e-3` would read
        # "-1e-3" as an unknown option and fail with "expected one argument".
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flag = unknown.group(1).split("=")[0]
            near = difflib.get_close_matches(flag, [o for o in self._option_string_actions if o.startswith("--")], 1)
            message += f" (did you mean {near[0]}?)" if near else ""
        line = f"[tinytron] error: {message}"
        self.exit(2, line + "\n" if claim_bad_input_report(line) else None)


def build_parser(description: str = "Tinytron pre-training") -> argparse.ArgumentParser:
    parser = FlagParser(description=description)
    for name, cls in SECTIONS.items():
        group = parser.add_argument_group(name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field(group, f, hints[f.name])
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    values = dict(vars(args))
    if values["block_size"] is None:  # the model takes the sequences it is trained on
        values["block_size"] = max(ModelConfig.block_size, values["seq_len"])
    return Config(**{name: cls(**{f.name: (tuple(values[f.name]) if isinstance(values[f.name], list)
                                           else values[f.name]) for f in dataclasses.fields(cls)})
                     for name, cls in SECTIONS.items()})
