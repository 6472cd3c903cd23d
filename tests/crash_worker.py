"""Test-only entry point for tests/test_lineage.py: pretrain_debug.py whose first torchrun attempt
crashes right after a checkpoint is written (what a node failure after a save looks like).

    --crash_after_save N    on torchrun attempt 0, every rank exits 1 once checkpoint N is saved
"""

import os

from tinytron.training import Trainer, run
from tinytron.training.arguments import build_parser


def main() -> None:
    parser = build_parser("Tinytron test worker")
    parser.set_defaults(use_mock_data=True)
    parser.add_argument_group("test").add_argument("--crash_after_save", type=int, default=-1)
    knobs = parser.parse_args()

    class CrashingTrainer(Trainer):
        def save(self) -> None:
            super().save()
            if self.step == knobs.crash_after_save and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
                os._exit(1)

    run(CrashingTrainer, parser)


if __name__ == "__main__":
    main()
