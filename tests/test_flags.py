"""Every numeric flag of the training parser has its range checked, at its edges: on each side that
has a limit, the boundary is accepted and the value just past it is refused with a one-line
ConfigError naming the flag, raised by validate_config (so by every rank, before any work; the CLI
tests of test_trainer.py check the exit code 2 and the single line).

The ranges are written here, as the intended ranges of the flags, independently of the bounds the
code declares (`bound=` in training/config.py, ModelConfig.validate): loosening or tightening a
declared bound fails a test. "Just past" is the neighbouring int, or the neighbouring float
(math.nextafter), so `> 0` and `>= 0`, `< 1` and `<= 1` are told apart.
"""

import argparse
import math

import pytest

from tests.utils import TINY_FLAGS
from tinytron.training.arguments import build_parser, config_from_args
from tinytron.training.config import ConfigError, validate_config


def r(interval: str, low: tuple = (), high: tuple | None = None) -> tuple:
    """A flag's range, "[a, b)" style (inf: no limit), in the config of TINY_FLAGS + `low` (its
    lower edge is checked there) or + `high` (its upper edge; default: `low`)."""
    return interval, list(low), list(low if high is None else high)


NO_MIN_LR = ("--min_lr", "0")   # --max_lr's only limit is then its own (min_lr <= max_lr otherwise)
MUON = ("--optimizer", "muon")  # --muon_ns_steps' upper limit is torch.optim.Muon's, checked with it

# flag -> its range in TINY_FLAGS' config (vocab 64, max_steps 8, max_lr 1e-2, 8 experts) with the
# flags that make the boundary value valid otherwise. A numeric flag added to the config must be
# added here: test_every_numeric_flag_is_listed fails.
RANGES = {
    # model
    "--block_size": r("[1, inf)", ("--seq_len", "1")),
    "--vocab_size": r("[1, inf)"),
    "--num_layer": r("[1, inf)"),
    "--num_attention_heads": r("[1, inf)", ("--num_key_value_heads", "1")),
    "--num_key_value_heads": r("[1, inf)"),
    # one head of an even head dim (RoPE): 2 is the smallest hidden size
    "--hidden_size": r("[2, inf)", ("--num_attention_heads", "1", "--num_key_value_heads", "1")),
    "--intermediate_size": r("[1, inf)"),
    "--dropout": r("[0, 1)"),
    "--rope_theta": r("(0, inf)"),
    "--norm_eps": r("(0, inf)"),
    "--init_std": r("(0, inf)"),
    "--num_experts": r("[1, inf)", ("--num_experts_per_tok", "1")),
    "--num_experts_per_tok": r("[1, 8]"),
    "--moe_intermediate_size": r("[1, inf)"),
    "--moe_aux_loss_coeff": r("[0, inf)"),
    "--moe_z_loss_coeff": r("[0, inf)"),
    # training
    "--total_batch_size": r("[1, inf)", ("--batch_size", "1", "--seq_len", "1")),
    "--batch_size": r("[1, inf)"),
    "--seq_len": r("[1, 16]"),   # up to --block_size 16
    "--max_epochs": r("[1, inf)"),
    "--max_steps": r("[0, inf)", ("--warmup_steps", "0")),
    "--grad_clip_value": r("[0, inf)"),
    "--seed": r("[0, inf)"),
    "--val_every_steps": r("[1, inf)"),
    "--val_max_tokens": r("[0, inf)"),   # and not in 1..seq_len-1: EDGES
    "--steps_to_profile": r("[0, inf)"),   # both values; first <= last: EDGES
    "--max_skipped_steps": r("[1, inf)"),
    "--eval_every_steps": r("[1, inf)"),
    # optim
    "--max_lr": r("(0, inf)", NO_MIN_LR),
    "--min_lr": r("[0, 1e-2]"),   # up to --max_lr
    "--warmup_steps": r("[0, 8)"),   # below --max_steps
    "--weight_decay": r("[0, inf)"),
    "--beta1": r("[0, 1)"),
    "--beta2": r("[0, 1)"),
    "--adam_eps": r("(0, inf)"),
    "--muon_lr": r("[0, inf)"),
    "--muon_momentum": r("[0, 1)"),
    "--muon_weight_decay": r("[0, inf)"),
    "--muon_ns_steps": r("[1, 100)", MUON),
    # data
    "--mock_data_num_samples": r("[1, inf)"),
    "--num_workers": r("[0, inf)"),
    "--val_fraction": r("[0, 1)"),
    "--tokenize_num_proc": r("[1, inf)"),
    # -1: the token cache's EOS (then no --document_mask with mock data); a token id needs the mask
    "--eos_token_id": r("[-1, 64)", (), ("--document_mask",)),
    # parallel
    "--sep_size": r("[1, inf)"),   # up to the world size (1 here): test_parallel_state
    "--dist_timeout_minutes": r("(0, inf)"),
    "--step_timeout_minutes": r("(0, inf)"),
    # checkpoint
    "--save_every_steps": r("[1, inf)"),
    "--keep_last_n_checkpoints": r("[0, inf)"),
    "--skip_data_steps": r("[0, inf)"),
    "--save_every_minutes": r("[0, inf)"),
}

# Limits that are not an interval: (flag, context, its values accepted, the values just past the edge).
EDGES = [
    ("--val_max_tokens", [], "16", "15"),   # 0 (all) or at least --seq_len
    ("--steps_to_profile", ["--use_profiler"], "3 3", "4 3"),   # first <= last
    ("--steps_to_profile", [], "0 0", "0 -1"),   # each value >= 0
]


def _numeric_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser._actions if a.type in (int, float)}


def _validate(*flags: str) -> None:
    validate_config(config_from_args(build_parser().parse_args([*TINY_FLAGS, *flags])), 1)


def _refused(flags: list[str], flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        _validate(*flags)
    message = str(e.value)
    assert flag in message and value in message and "\n" not in message, message


def _edges(flag: str, side: str) -> tuple[str, str] | None:
    """(the accepted value at `side`'s boundary, the refused value just past it), None without a limit."""
    interval = RANGES[flag][0]
    closed = interval[0] == "[" if side == "low" else interval[-1] == "]"
    edge = float(interval[1:-1].split(",")[0 if side == "low" else 1])
    if math.isinf(edge):
        return None
    outward = -math.inf if side == "low" else math.inf
    if _numeric_flags(build_parser())[flag].type is int:
        edge, step = int(edge), -1 if side == "low" else 1
        inside, outside = (edge, edge + step) if closed else (edge - step, edge)
    else:
        inward = -outward
        inside, outside = (edge, math.nextafter(edge, outward)) if closed else (math.nextafter(edge, inward), edge)
    return repr(inside), repr(outside)


def test_every_numeric_flag_is_listed():
    assert set(_numeric_flags(build_parser())) == set(RANGES)


@pytest.mark.parametrize("side", ["low", "high"])
@pytest.mark.parametrize("flag", sorted(RANGES))
def test_boundary_accepted_and_just_past_refused(flag, side):
    edges = _edges(flag, side)
    if edges is None:
        assert side == "high", f"{flag}: every numeric flag has a lower limit"
        return
    inside, outside = edges
    context = RANGES[flag][1 if side == "low" else 2]
    def given(value: str) -> list[str]:   # as typed: "--max_lr -5e-324", a negative number as its own argument
        nargs = _numeric_flags(build_parser())[flag].nargs
        return [flag, *[value] * (nargs or 1)]
    _validate(*context, *given(inside))
    _refused([*context, *given(outside)], flag, outside)


@pytest.mark.parametrize("flag, context, accepted, refused", EDGES)
def test_other_limits(flag, context, accepted, refused):
    _validate(*context, flag, *accepted.split())
    _refused([*context, flag, *refused.split()], flag, refused)


def test_block_size_follows_seq_len_unless_given():
    def config(*flags):
        return config_from_args(build_parser().parse_args(["--use_mock_data", *flags]))

    assert config().model.block_size == 1024  # the default, as before: run folders keep their hash
    assert config("--seq_len", "256").model.block_size == 1024
    long = config("--seq_len", "4096", "--total_batch_size", "262144")
    assert long.model.block_size == 4096
    validate_config(long, 1)
    with pytest.raises(ConfigError, match="^--seq_len 4096 exceeds --block_size 2048$"):
        validate_config(config("--seq_len", "4096", "--block_size", "2048", "--total_batch_size", "262144"), 1)
