"""The entry point of the training scripts: parse the flags, train, and fail the same way on every
rank: one line (see distributed/abort.py), exit code 2 for bad input, 1 otherwise."""

import os
import sys
import traceback

import torch.distributed as dist

from tinytron.distributed import abort
from tinytron.distributed.runtime import close_runtime
from tinytron.training import checkpoint as ckpt
from tinytron.training.checkpoint_save import CheckpointWriteError
from tinytron.training.config import ConfigError
from tinytron.training.preflight import check_flags
from tinytron.training.trainer import Trainer, TrainingError


def run(trainer_cls=Trainer, parser=None, argv=None) -> None:
    """Entry point for scripts: parse flags and train. A failure is one line, the same on every
    rank (see distributed/abort.py), and the exit code: 2 for bad input, 1 otherwise."""
    from tinytron.training.arguments import build_parser, config_from_args
    parser = parser or build_parser()
    config = config_from_args(parser.parse_args(argv))
    world = int(os.environ.get("TINYTRON_PREFLIGHT") or 0)   # 0: off
    if world:   # scripts/launch.sh, before it starts torchrun: the flags alone, in this process
        try:
            check_flags(config, world)
        except ConfigError as e:
            print(f"[tinytron] error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    try:
        trainer_cls(config).train()
    except (ConfigError, ckpt.CheckpointError) as e:
        abort.fail(f"[tinytron] error: {e}", 2)
    except (TrainingError, CheckpointWriteError) as e:
        abort.fail(f"[tinytron] error: {e}", 1)
    except Exception as e:  # noqa: BLE001 - one line for the other ranks, after the traceback
        rank = dist.get_rank() if dist.is_initialized() else 0
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # gloo raises RuntimeError, NCCL DistBackendError (a RuntimeError)
        if dist.is_initialized() and isinstance(e, RuntimeError) and _is_comm_failure(e):
            # A peer stopped answering (timeout) or died: a symptom, so not posted to the other
            # ranks (they see it too); say which rank saw it and what it waited for.
            abort.fail(f"[tinytron] error: rank {rank}: collective failed (a rank died or exceeded "
                       f"--dist_timeout_minutes {config.parallel.dist_timeout_minutes}): {first}", 1, post=False)
        traceback.print_exc()
        abort.fail(f"[tinytron] error: rank {rank}: {type(e).__name__}: {first}", 1)
    close_runtime()


def _is_comm_failure(e: Exception) -> bool:
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(
        k in text for k in ("timed out", "timeout", "connection closed", "connection reset", "gloo", "nccl"))
