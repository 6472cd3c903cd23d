"""Score multiple-choice tasks (acc, acc_norm) on a Tinytron checkpoint or a Hugging Face folder.

    tinytron-eval --checkpoint logs/run_abcd1234 --tasks hellaswag_val.jsonl[,other.jsonl]
        [--tokenizer <folder or hub name>] [--precision fp32] [--batch_tokens 16384] [--device auto]
        [--out results.json]
    python -m tinytron.commands.eval ...       (the same)
    torchrun --nproc_per_node 8 -m tinytron.commands.eval ...   (items split over the processes)

Scores as the Trainer's --eval_tasks does (tinytron/training/downstream.py): the definitions and
the tokenization of lm-evaluation-harness, so the figures equal lm-eval's on the exported model.
--checkpoint is a step folder, a run folder (its newest complete checkpoint), a model.pt next to
its meta.pt, or a Llama / Mixtral folder. The tokenizer defaults to the run's --tokenizer (or the
one saved in the Hugging Face folder). Prints one line per task; --out writes the accuracies and
every ending's log-likelihood as JSON.
"""

import json

import torch
import torch.distributed as dist

from tinytron.data.multiple_choice import read_tasks
from tinytron.data.tokenize import load_tokenizer
from tinytron.distributed.runtime import RuntimeSetupError, init_runtime
from tinytron.interop.hf import is_hf_dir, load_hf
from tinytron.model import GPT
from tinytron.training.arguments import FlagParser
from tinytron.training.downstream import DownstreamEval
from tinytron.training.weights import read_checkpoint, run_tokenizer


def load_model(path: str, tokenizer: str | None) -> tuple[GPT, str | None, dict]:
    """-> (GPT in fp32 on CPU, eval mode; the tokenizer to use; the checkpoint's meta, {} for HF)."""
    if is_hf_dir(path):
        return load_hf(path)[0], tokenizer or path, {}
    state, config, meta = read_checkpoint(path)
    model = GPT(config)
    model.load_state_dict(state)
    return model.eval(), tokenizer or run_tokenizer(meta), meta


def main(argv: list[str] | None = None) -> None:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Tinytron step/run folder or model.pt, or a HF folder")
    parser.add_argument("--tasks", required=True, help="comma-separated task files (.jsonl: context, endings, label)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub name (default: the run's)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="fp32, or bf16 autocast")
    parser.add_argument("--batch_tokens", type=int, default=16384, help="padded tokens per forward (default: 16384)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--out", default=None, help="write the scores and log-likelihoods here (JSON)")
    args = parser.parse_args(argv)
    try:
        if args.batch_tokens < 1:
            raise ValueError(f"--batch_tokens {args.batch_tokens} must be positive")
        rt = init_runtime(args.device)
        tasks = read_tasks(args.tasks)
        model, tokenizer, meta = load_model(args.checkpoint, args.tokenizer)
        if tokenizer is None:
            raise ValueError("no tokenizer: pass --tokenizer (the checkpoint's run has none recorded)")
        config = model.config
        scorer = DownstreamEval(tasks, load_tokenizer(tokenizer), config.block_size, args.batch_tokens,
                                config.vocab_size)
    except (ValueError, RuntimeSetupError) as e:   # bad input: one line, exit 2
        parser.error(str(e))
    autocast = (lambda: torch.autocast(rt.device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else None
    scores = scorer.evaluate(model.to(rt.device), autocast)
    if dist.is_initialized():
        dist.destroy_process_group()
    if not rt.is_main:
        return
    at = f", step {meta['step']}" if "step" in meta else ""
    for name, s in scores.items():
        print(f"{name}: acc {s.acc:.4f} acc_norm {s.acc_norm:.4f} ({s.items} items{at})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "step": meta.get("step"),
                       "tasks": {name: vars(s) for name, s in scores.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
