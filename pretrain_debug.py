"""Pre-train on mock data: `python pretrain_debug.py ...` or `torchrun ... pretrain_debug.py ...`.

Flags: `python pretrain_debug.py --help`.
"""

from tinytron.training import run
from tinytron.training.arguments import build_parser

if __name__ == "__main__":
    parser = build_parser("Tinytron pre-training on mock data")
    parser.set_defaults(use_mock_data=True)
    run(parser=parser)
