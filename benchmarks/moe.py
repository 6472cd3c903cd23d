"""Expert parallelism (ep 2) against all experts on every rank (ep 1) for a tiny MoE GPT.

    torchrun --nproc_per_node 2 -m benchmarks.moe [--steps 10 --num_experts 8 ...]

Every rank processes its own `--batch` sequences of `--seq_len` tokens in both layouts (so the
same tokens per rank and the same expert FLOPs under balanced routing); only the MoE layers
differ: ep 1 runs all experts locally, ep 2 keeps half of them per rank and moves tokens with the
dispatch / combine all-to-alls. Attention stays local (no Ulysses) so the difference is the cost
of expert parallelism alone. Timed: forward + backward of one step (loss = token cross-entropy +
MoE aux loss), slowest rank, median over `--steps`. All-to-all bytes are counted on the wire:
rows each rank sends to other ranks (its own chunk is a local copy), in forward and backward.
Runs on CPU with gloo, or on CUDA with NCCL (one GPU per process). Timings on a shared machine are
noisy: run it on otherwise idle cores.
"""

import statistics

import torch
import torch.distributed as dist

from benchmarks.common import alternate_steps, init_distributed, layout_parser, layout_report, slowest_rank_seconds
from tinytron.distributed import parallel_state as ps
from tinytron.distributed.expert_parallel import apply_expert_parallel
from tinytron.model import GPT, ModelConfig
from tinytron.model.gpt import cross_entropy_sum


class Layout:
    """The MoE model with experts split over `ep` ranks and this rank's batch; `step()` runs one
    forward + backward and returns its time (s) on the slowest rank."""

    def __init__(self, args, ep: int, device: torch.device):
        state = ps.initialize_parallel_state(sep_size=ep)
        self.config = ModelConfig(
            block_size=args.seq_len, vocab_size=args.vocab_size, num_layer=args.num_layer,
            num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads, hidden_size=args.hidden_size,
            use_moe=True, num_experts=args.num_experts, num_experts_per_tok=args.top_k,
            moe_intermediate_size=args.moe_intermediate_size)
        torch.manual_seed(0)
        self.model = GPT(self.config).to(device)
        if ep > 1:
            apply_expert_parallel(self.model, state.sep_group)
        g = torch.Generator().manual_seed(dist.get_rank())
        tokens = torch.randint(self.config.vocab_size, (args.batch, args.seq_len + 1), generator=g)
        self.idx, self.targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        self.num_tokens = args.batch * args.seq_len
        self.device = device
        self.name = f"ep {ep}"
        self.expert_params = sum(p.numel() for p in self.model.parameters()
                                 if getattr(p, "is_expert", False))

    def step(self) -> float:
        self.model.zero_grad(set_to_none=True)

        def fwd_bwd():
            out = self.model(self.idx, return_aux=True)
            (cross_entropy_sum(out.logits, self.targets) / self.num_tokens + out.aux_loss).backward()

        return slowest_rank_seconds(fwd_bwd, self.device)


def main() -> None:
    p = layout_parser(__doc__.split("\n")[0], seq_len=256)
    p.add_argument("--num_experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--moe_intermediate_size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()

    device = init_distributed(args.device)
    world = dist.get_world_size()
    layouts = [Layout(args, ep, device) for ep in (1, world)]
    times, sent = alternate_steps(layouts, args.warmup, args.steps)
    if dist.get_rank() == 0:
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(layout_report(
            device, "benchmarks.moe",
            f"{args.num_layer} layers, hidden {args.hidden_size}, {args.num_experts} experts top-{args.top_k} of size "
            f"{args.moe_intermediate_size}, vocab {args.vocab_size}; per rank {args.batch} x {args.seq_len} tokens",
            ["layout", "expert params per rank", "fwd+bwd median (ms)", "tokens/s per rank",
             "all-to-all sent by rank 0 per step (MiB)"],
            [[layout.name, f"{layout.expert_params / 1e6:.2f} M", f"{1e3 * medians[layout.name]:.0f}",
              f"{layout.num_tokens / medians[layout.name]:.0f}",
              f"{statistics.mean(sent[layout.name]) / 2**20:.2f}"] for layout in layouts]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
