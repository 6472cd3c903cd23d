"""Our GPT against its peers in `transformers`, trained side by side in one process at equal tokens.

    python -m benchmarks.peers                                             (CPU: tiny shapes, fp32, eager)
    python -m benchmarks.peers --device cuda --preset gpu --pair gpt2      (GPT-2 124M shape, bf16, compiled)
    python -m benchmarks.peers --device cuda --preset gpu --pair llama     (the 0.25B preset)

Pairs (--preset gpu; --preset cpu shrinks both to a few layers that a CPU runs in seconds):
  gpt2   `GPT2LMHeadModel` (the GPT-2 reference architecture: learned positions, LayerNorm, GELU MLP
         4C, biases, tied head; dropout 0, attn_implementation "sdpa") against our GPT of the same
         shape (12 x 768, 12 heads, MHA, vocab 50304, 16 x 1024 tokens) with SwiGLU 2048, which
         has the GELU MLP's weights and FLOPs (3 x 768 x 2048 = 8 x 768^2).
  llama  `LlamaForCausalLM` with our 0.25B preset's weights (`to_hf_model`: the same network;
         attn_implementation "sdpa"), 4 x 4096 tokens.
Both models of a pair train on the same batch, B x T inputs scored on B x T targets (HF's own
`labels=` path would shift and score T - 1): ours through its training forward (the chunked head +
cross-entropy), the peer's logits through `cross_entropy_loss` (fp32 log-softmax over the full
vocabulary, what transformers' loss does). Compiled whole (default on CUDA, --no-compile to turn
off): ours as the Trainer's --use_compile, the peer's forward and loss as one compiled function.
bf16 autocast over fp32 parameters on CUDA (--dtype), AdamW fused on CUDA for both. The models'
steps alternate (A B, B A, ...) after --warmup steps each (compilation included); medians of
--steps timed steps. MFU: tokens/s x model FLOPs per token / the GPU's bf16 peak, in the Trainer's
causal convention (`flops_per_token`; the same count for GPT-2's GELU MLP). Peak memory (CUDA): the
model's own parameters and AdamW state plus the largest peak allocated during one of its steps
above the memory held between steps (the other model's is excluded).
"""

import argparse
import dataclasses
import statistics

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.common import AUTOCAST_DTYPES, PRESETS, TrainStep, markdown_table, report
from benchmarks.throughput import measure
from tinytron.interop.hf import to_hf_model
from tinytron.model import GPT, ModelConfig
from tinytron.model.gpt import cross_entropy_loss
from tinytron.utils.profile import flops_per_token, peak_flops


@dataclasses.dataclass(frozen=True)
class Shape:
    config: ModelConfig
    batch: int
    seq_len: int


def _gpt2_shape(num_layer: int, hidden: int, heads: int, vocab: int, seq_len: int, batch: int) -> Shape:
    """Our GPT at a GPT-2 shape: MHA, SwiGLU with the GELU MLP's weights (3 C I = 8 C^2)."""
    config = ModelConfig(vocab_size=vocab, num_layer=num_layer, num_attention_heads=heads, num_key_value_heads=heads,
                         hidden_size=hidden, intermediate_size=round(8 * hidden / 3), block_size=seq_len)
    return Shape(config, batch, seq_len)


SHAPES = {
    ("gpt2", "gpu"): _gpt2_shape(12, 768, 12, 50304, 1024, 16),
    ("gpt2", "cpu"): _gpt2_shape(2, 96, 4, 4096, 128, 4),
    ("llama", "gpu"): Shape(PRESETS["0.25b"].config, PRESETS["0.25b"].batch, PRESETS["0.25b"].seq_len),
    ("llama", "cpu"): Shape(dataclasses.replace(PRESETS["cpu"].config, num_layer=2), 4, 128),
}
PEERS = {"gpt2": "HF GPT2LMHeadModel", "llama": "HF LlamaForCausalLM"}


def _gpt2(config: ModelConfig) -> torch.nn.Module:
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size,
                                    n_embd=config.hidden_size, n_layer=config.num_layer,
                                    n_head=config.num_attention_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))
    hf.set_attn_implementation("sdpa")
    return hf


def build(pair: str, shape: Shape, device: torch.device, dtype, compile_: bool) -> dict:
    """{name: (TrainStep, model, FLOPs per token)} of the pair's two models."""
    config = shape.config
    torch.manual_seed(0)
    ours = GPT(config)
    if pair == "llama":
        peer = to_hf_model(ours, config)   # a copy of our fp32 weights
        peer.set_attn_implementation("sdpa")
    else:
        peer = _gpt2(config)
    ours.to(device).train()
    peer.to(device).train()
    data = torch.randint(config.vocab_size, (shape.batch, shape.seq_len + 1),
                         generator=torch.Generator().manual_seed(0)).to(device)
    x, y = data[:, :-1], data[:, 1:]

    def peer_loss(x, y):
        return cross_entropy_loss(peer(input_ids=x, use_cache=False).logits, y)
    if compile_:
        ours.compile(fullgraph=True, dynamic=False)
        peer_loss = torch.compile(peer_loss, dynamic=False)
    fused = device.type == "cuda"
    flops = flops_per_token(config, shape.seq_len)   # GPT-2's GELU MLP: the same matmul FLOPs
    return {"Tinytron GPT": (TrainStep(ours, lambda: ours(x, y)[1], device, dtype, fused), ours, flops),
            PEERS[pair]: (TrainStep(peer, lambda: peer_loss(x, y), device, dtype, fused), peer, flops)}


def _state_bytes(model: torch.nn.Module, step: TrainStep) -> int:
    """Parameters and AdamW state of `model`, in bytes."""
    state = [t for s in step.opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *state])


def run_pair(pair: str, args, device: torch.device) -> str:
    shape = SHAPES[pair, args.preset]
    models = build(pair, shape, device, AUTOCAST_DTYPES[args.dtype], args.compile)
    results = measure({name: m[0] for name, m in models.items()}, device, args.warmup, args.steps)
    tokens, peak = shape.batch * shape.seq_len, peak_flops(device)
    on_cuda = device.type == "cuda"
    stats = {}
    for name, (step, model, flops) in models.items():
        tok_s = tokens / statistics.median(results[name]["wall"])
        memory = _state_bytes(model, step) + results[name]["memory"] if on_cuda else None
        stats[name] = (tok_s, None if peak is None else tok_s * flops / peak, memory,
                       sum(p.numel() for p in model.parameters()))
    peer = stats[PEERS[pair]]
    rows = []
    for name, (tok_s, mfu, memory, params) in stats.items():
        rows.append([name, f"{params / 1e6:.1f}M", f"{tok_s:,.0f}", "n/a" if mfu is None else f"{mfu:.1%}",
                     f"{memory / 2**30:.2f}" if on_cuda else "n/a", f"{tok_s / peer[0]:.3f}",
                     f"{memory / peer[2]:.3f}" if on_cuda else "n/a"])
    c = shape.config
    return (f"**{pair}**: {c.num_layer} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads / "
            f"{c.num_key_value_heads} kv heads, our intermediate {c.intermediate_size}, vocab {c.vocab_size}; "
            f"{shape.batch} x {shape.seq_len} tokens per step; first-step losses "
            + ", ".join(f"{n} {results[n]['loss'][0].item():.4f}" for n in models) + "\n\n"
            + markdown_table(["model", "params", "tokens/s", "MFU", "peak GiB", "tokens/s vs peer",
                              "peak memory vs peer"], rows) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu", help="tiny shapes, or the full ones")
    p.add_argument("--pair", choices=("gpt2", "llama", "both"), default="both")
    p.add_argument("--dtype", choices=sorted(AUTOCAST_DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on CUDA only")
    p.add_argument("--warmup", type=int, default=3, help="steps per model not timed (compilation included)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--append", metavar="PATH", help="append the result section to this markdown file")
    args = p.parse_args()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.compile = on_cuda if args.compile is None else args.compile
    pairs = ("gpt2", "llama") if args.pair == "both" else (args.pair,)
    body = (f"{args.dtype}{' autocast' if args.dtype != 'fp32' else ''}, "
            f"{'compiled whole' if args.compile else 'eager'}; median of {args.steps} timed steps per model after "
            f"{args.warmup} warm-up, the models alternating.\n\n" + "\n".join(run_pair(pair, args, device)
                                                                           for pair in pairs))
    report(f"Peers: Tinytron GPT vs transformers at equal tokens ({args.preset} shapes, {args.dtype}, "
           f"{device.type})", device, "benchmarks.peers", body, args.append)


if __name__ == "__main__":
    main()
