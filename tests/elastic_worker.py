"""Test-only entry point for tests/test_elastic.py and tests/test_hangs.py: pretrain_debug.py with a
Trainer that can be made slow or stuck, to put a failure at a chosen point of a torchrun job.

    --step_sleep S                     every rank sleeps S seconds before each step
    --stall_rank R --stall_step N --stall_seconds S
                                       rank R sleeps S seconds before step N (a stuck rank)
    --sigstop_rank R --sigstop_step N  on torchrun attempt 0, rank R stops itself with SIGSTOP in
                                       step N (`kill -STOP`), 0.5 s in: its last step is published
    --straggler_rank R --straggler_every K --straggler_seconds S
                                       rank R sleeps S seconds in the forward of every K-th step
                                       (step % K == K // 2): a straggler
    --slow_phases_rank R --slow_phases_seconds S
                                       rank R sleeps S seconds at the start of its first save and
                                       its first validation (the others wait for it there)
"""

import os
import signal
import time

from tinytron.training import Trainer, run
from tinytron.training.arguments import build_parser


def main() -> None:
    parser = build_parser("Tinytron test worker")
    parser.set_defaults(use_mock_data=True)
    test = parser.add_argument_group("test")
    test.add_argument("--step_sleep", type=float, default=0.0)
    for knob in ("stall_rank", "stall_step", "sigstop_rank", "sigstop_step", "straggler_rank", "slow_phases_rank"):
        test.add_argument(f"--{knob}", type=int, default=-1)
    test.add_argument("--straggler_every", type=int, default=1)
    for knob in ("stall_seconds", "straggler_seconds", "slow_phases_seconds"):
        test.add_argument(f"--{knob}", type=float, default=0.0)
    knobs = parser.parse_args()
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    class SlowTrainer(Trainer):
        slowed = set()   # the phases already slowed

        def train_step(self, batches) -> dict:
            time.sleep(knobs.step_sleep)
            if self.rank == knobs.stall_rank and self.step == knobs.stall_step:
                time.sleep(knobs.stall_seconds)  # the peers wait in this step's first collective
            if self.rank == knobs.sigstop_rank and self.step == knobs.sigstop_step and first_attempt:
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGSTOP)
            return super().train_step(batches)

        def _forward_loss(self, batch):
            every = knobs.straggler_every
            if self.rank == knobs.straggler_rank and self.step % every == every // 2:
                time.sleep(knobs.straggler_seconds)
            return super()._forward_loss(batch)

        def _slow(self, phase: str) -> None:
            if self.rank == knobs.slow_phases_rank and phase not in self.slowed:
                self.slowed.add(phase)
                time.sleep(knobs.slow_phases_seconds)

        def save(self) -> None:
            self._slow("save")
            super().save()

        def evaluate(self) -> float:
            self._slow("validation")
            return super().evaluate()

    run(SlowTrainer, parser)


if __name__ == "__main__":
    main()
