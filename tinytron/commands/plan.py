"""Will it fit? Per-rank GPU memory of a run, from its flags, without allocating the model.

    tinytron-plan <the flags of a run> --gpu_memory_gib 80 --world_size 64
    python -m tinytron.commands.plan ...       (the same)

Prints, for one rank, parameters, gradients, AdamW state, bf16 weight copies and activations, and
the largest --batch_size that fits (the estimate and its assumptions: tinytron/training/memory.py).
"""


from tinytron.training.arguments import build_parser, config_from_args
from tinytron.training.config import ConfigError
from tinytron.training.memory import plan


def main(argv=None) -> None:
    parser = build_parser("Tinytron memory plan: per-rank GPU memory of a run, without allocating it")
    group = parser.add_argument_group("plan")
    group.add_argument("--gpu_memory_gib", type=float, default=80.0, help="memory of one GPU (default: %(default)s)")
    group.add_argument("--world_size", type=int, default=8, help="ranks of the run (default: %(default)s)")
    group.add_argument("--usable_fraction", type=float, default=0.9,
                       help="share of the GPU the run may use (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.world_size < 1 or args.gpu_memory_gib <= 0 or not 0 < args.usable_fraction <= 1:
            raise ConfigError("--world_size must be >= 1, --gpu_memory_gib > 0 and --usable_fraction in (0, 1]")
        print(plan(config_from_args(args), args.world_size, args.gpu_memory_gib, args.usable_fraction))
    except ConfigError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
