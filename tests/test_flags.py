"""Every numeric flag of the training parser has its range checked: an out-of-range value is a
one-line ConfigError naming the flag and the value, raised by validate_config (so by every rank,
before any work; the CLI tests of test_trainer.py check the exit code 2 and the single line)."""

import argparse

import pytest

from tests.utils import TINY_FLAGS
from tinytron.training.arguments import build_parser, config_from_args
from tinytron.training.config import ConfigError, validate_config

# flag -> (a value outside its range, the value at the edge of its range, which is accepted).
# A numeric flag added to the config must be added here: test_every_numeric_flag_is_listed fails.
OUT_OF_RANGE = {
    # model
    "--block_size": ("0", "16"), "--vocab_size": ("0", "1"), "--num_layer": ("0", "1"),
    "--num_attention_heads": ("0", "4"), "--num_key_value_heads": ("0", "1"), "--hidden_size": ("-32", "32"),
    "--intermediate_size": ("0", "1"), "--dropout": ("1.0", "0.0"), "--rope_theta": ("0", "1e-3"),
    "--norm_eps": ("0", "1e-12"), "--init_std": ("-0.02", "1e-6"), "--num_experts": ("0", "2"),
    "--num_experts_per_tok": ("0", "1"), "--moe_intermediate_size": ("0", "1"),
    "--moe_aux_loss_coeff": ("-0.01", "0"), "--moe_z_loss_coeff": ("-0.001", "0"),
    # training
    "--total_batch_size": ("-128", "128"), "--batch_size": ("0", "2"), "--seq_len": ("0", "16"),
    "--max_epochs": ("0", "1"), "--max_steps": ("-1", "0"), "--grad_clip_value": ("-1", "0"),
    "--seed": ("-1", "0"), "--val_every_steps": ("0", "1"), "--val_max_tokens": ("-1", "0"),
    "--steps_to_profile": ("-1 3", "0 0"), "--max_skipped_steps": ("0", "1"), "--eval_every_steps": ("0", "1"),
    # optim
    "--max_lr": ("0", "1e-2"), "--min_lr": ("-0.00001", "0"), "--warmup_steps": ("-1", "0"),
    "--weight_decay": ("-0.1", "0"), "--beta1": ("1.0", "0"), "--beta2": ("-0.5", "0.999"),
    "--adam_eps": ("0", "1e-12"), "--muon_lr": ("-0.001", "0"), "--muon_momentum": ("1.0", "0"),
    "--muon_weight_decay": ("-0.1", "0"), "--muon_ns_steps": ("0", "1"),
    # data
    "--mock_data_num_samples": ("0", "128"), "--num_workers": ("-1", "0"), "--val_fraction": ("1.0", "0"),
    "--tokenize_num_proc": ("0", "1"), "--eos_token_id": ("-2", "-1"),
    # parallel
    "--sep_size": ("0", "1"), "--dist_timeout_minutes": ("0", "0.5"),
    # checkpoint
    "--save_every_steps": ("0", "1"), "--keep_last_n_checkpoints": ("-2", "0"), "--skip_data_steps": ("-1", "0"),
    "--save_every_minutes": ("-1", "0"),
}


def _numeric_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {a.option_strings[0] for a in parser._actions if a.type in (int, float)}


def _validate(*flags):
    validate_config(config_from_args(build_parser().parse_args([*TINY_FLAGS, *flags])), 1)


def test_every_numeric_flag_is_listed():
    assert _numeric_flags(build_parser()) == set(OUT_OF_RANGE)


@pytest.mark.parametrize("flag", sorted(OUT_OF_RANGE))
def test_out_of_range_value_is_refused_in_one_line(flag):
    bad, edge = OUT_OF_RANGE[flag]
    with pytest.raises(ConfigError) as e:
        _validate(flag, *bad.split())
    message = str(e.value)
    head, sep, _ = message.partition(" must be ")
    name, *values = head.split()
    assert sep and name == flag and list(map(float, values)) == list(map(float, bad.split())), message
    assert "\n" not in message
    _validate(flag, *edge.split())  # the edge of the range is accepted


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
