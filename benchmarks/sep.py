"""Ulysses sequence parallelism (sep 2) against data parallelism (dp 2) at equal work.

    torchrun --nproc_per_node 2 -m benchmarks.sep [--steps 10 --seq_len 1024 ...]

Both layouts process the same global batch per step, `world` sequences of `--seq_len` tokens, so
every rank handles the same number of tokens: dp 2 gives each rank one whole sequence; sep 2 gives
each rank half of each of the two sequences, and attention runs over the full sequences through
Ulysses all-to-alls. Timed: forward + backward of one step (the gradient all-reduce, identical in
both layouts, is left out), the slowest rank's time per step, median over `--steps`. Prints a
markdown table on rank 0. Runs on CPU with gloo, or on CUDA with NCCL (one GPU per process).
Timings on a shared machine are noisy: run it on otherwise idle cores.
"""

import statistics

import torch
import torch.distributed as dist

from benchmarks.common import alternate_steps, init_distributed, layout_parser, layout_report, slowest_rank_seconds
from tinytron.distributed import parallel_state as ps
from tinytron.distributed.sequence_parallel import apply_sequence_parallel, sequence_chunk
from tinytron.distributed.sequence_parallel.ulysses import kv_heads_to_send
from tinytron.model import GPT, ModelConfig
from tinytron.model.gpt import cross_entropy_sum


def a2a_bytes_per_step(config: ModelConfig, batch: int, local_len: int, sep: int,
                       elem_bytes: int) -> int:
    """Bytes one rank sends to other ranks through Ulysses all-to-alls in one forward + backward.

    Per layer and direction, three all-to-alls of [B, T/sep, heads, D] buffers: q (H heads), k and
    v stacked (2 x kv heads as sent) and the attention output (H heads); each rank keeps 1/sep of
    every buffer. The backward of each all-to-all is an all-to-all of the same size.
    """
    if sep == 1:
        return 0
    heads = 2 * config.num_attention_heads + 2 * kv_heads_to_send(config.num_key_value_heads, sep)
    per_direction = config.num_layer * batch * local_len * heads * config.head_dim * elem_bytes
    return 2 * per_direction * (sep - 1) // sep


class Layout:
    """The model and this rank's batch for the world split as dp x sep; `step()` runs one
    forward + backward and returns its time (s) on the slowest rank."""

    def __init__(self, args, sep: int, device: torch.device):
        state = ps.initialize_parallel_state(sep_size=sep)
        batch = state.world_size // state.dp_size      # sequences per rank; global batch = world
        local_len = args.seq_len // sep
        self.config = ModelConfig(
            block_size=args.seq_len, vocab_size=args.vocab_size, num_layer=args.num_layer,
            num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads, hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size)
        torch.manual_seed(0)
        self.model = GPT(self.config).to(device)
        if sep > 1:
            apply_sequence_parallel(self.model, state.sep_group)
        # Sequences of this DP rank; this SEP rank's chunk of them, at its global positions.
        g = torch.Generator().manual_seed(state.dp_rank)
        tokens = torch.randint(self.config.vocab_size, (batch, args.seq_len + 1), generator=g)
        self.idx, self.targets, self.position_ids = (
            t.to(device) for t in sequence_chunk(tokens[:, :-1], tokens[:, 1:], state.sep_rank, sep))
        self.total_tokens = batch * args.seq_len
        self.device = device
        self.name = f"dp {state.dp_size} x sep {sep}"
        self.shape = f"[{batch}, {local_len}]"
        self.a2a_bytes = a2a_bytes_per_step(self.config, batch, local_len, sep, elem_bytes=4)

    def step(self) -> float:
        self.model.zero_grad(set_to_none=True)

        def fwd_bwd():
            logits = self.model(self.idx, position_ids=self.position_ids)
            (cross_entropy_sum(logits, self.targets) / self.total_tokens).backward()

        return slowest_rank_seconds(fwd_bwd, self.device)


def main() -> None:
    p = layout_parser(__doc__.split("\n")[0], seq_len=1024)
    p.add_argument("--intermediate_size", type=int, default=768)
    args = p.parse_args()

    device = init_distributed(args.device)
    world = dist.get_world_size()
    if args.seq_len % world:
        p.error(f"--seq_len {args.seq_len} must be divisible by the world size {world}")
    layouts = [Layout(args, sep, device) for sep in (1, world)]
    times, sent = alternate_steps(layouts, args.warmup, args.steps)
    for layout in layouts:
        assert set(sent[layout.name]) == {layout.a2a_bytes}, \
            f"{layout.name}: all-to-all sent {sent[layout.name]} B, formula {layout.a2a_bytes} B"
    if dist.get_rank() == 0:
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(layout_report(
            device, "benchmarks.sep",
            f"{args.num_layer} layers, hidden {args.hidden_size}, heads {args.num_attention_heads} "
            f"(kv {args.num_key_value_heads}), vocab {args.vocab_size}; global batch {world} x {args.seq_len} tokens",
            ["layout", "tokens per rank [B, T]", "fwd+bwd median (ms)", "tokens/s",
             "all-to-all sent per rank per step (MiB)"],
            [[layout.name, layout.shape, f"{1e3 * medians[layout.name]:.0f}",
              f"{world * args.seq_len / medians[layout.name]:.0f}", f"{layout.a2a_bytes / 2**20:.2f}"]
             for layout in layouts]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
