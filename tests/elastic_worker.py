"""Test-only entry point for tests/test_elastic.py: pretrain_debug.py with a Trainer that can be
made slow or stuck, to put a failure at a chosen point of a torchrun job.

    --step_sleep S                     every rank sleeps S seconds before each step
    --stall_rank R --stall_step N --stall_seconds S
                                       rank R sleeps S seconds before step N (a stuck rank)
"""

import time

from tinytron.training import Trainer, run
from tinytron.training.arguments import build_parser


def main() -> None:
    parser = build_parser("Tinytron test worker")
    parser.set_defaults(use_mock_data=True)
    test = parser.add_argument_group("test")
    test.add_argument("--step_sleep", type=float, default=0.0)
    test.add_argument("--stall_rank", type=int, default=-1)
    test.add_argument("--stall_step", type=int, default=-1)
    test.add_argument("--stall_seconds", type=float, default=0.0)
    knobs = parser.parse_args()

    class SlowTrainer(Trainer):
        def train_step(self, batches) -> dict:
            time.sleep(knobs.step_sleep)
            if self.rank == knobs.stall_rank and self.step == knobs.stall_step:
                time.sleep(knobs.stall_seconds)  # the peers wait in this step's first collective
            return super().train_step(batches)

    run(SlowTrainer, parser)


if __name__ == "__main__":
    main()
