"""Export a Tinytron checkpoint to a Hugging Face `transformers` folder.

    tinytron-export --checkpoint logs/run_abcd1234 --out hf_model [--dtype bf16]
        [--tokenizer <folder or hub name>]
    python -m tinytron.commands.export ...     (the same)

--checkpoint is a step folder, a run folder (its newest complete checkpoint) or a model.pt next to
its meta.pt. Dense models become LlamaForCausalLM, MoE models MixtralForCausalLM; the folder loads
with AutoModelForCausalLM / AutoTokenizer.from_pretrained. Without --tokenizer, the run's
--tokenizer (from meta.pt) is saved when it has one. --out must be new or empty, unless
--overwrite (files of the same names are then replaced, others kept).
"""

import os

import torch

from tinytron.data.tokenize import load_tokenizer
from tinytron.interop.hf import export_hf
from tinytron.training.arguments import FlagParser
from tinytron.training.weights import read_checkpoint, run_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> None:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="step folder, run folder or model.pt")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="weight dtype (default: fp32)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub name to save with the model "
                        "(default: the run's --tokenizer, if any)")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard (default: 2GB)")
    parser.add_argument("--overwrite", action="store_true", help="export into a non-empty --out, replacing "
                        "its files of the same names")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file, not a folder")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        parser.error(f"--out {args.out} is not empty: name a new folder, or add --overwrite to replace its files")
    try:
        state, config, meta = read_checkpoint(args.checkpoint)
        tokenizer = args.tokenizer or run_tokenizer(meta)
        export_hf(state, config, args.out, DTYPES[args.dtype], tokenizer=tokenizer and load_tokenizer(tokenizer),
                  max_shard_size=args.max_shard_size)
    except ValueError as e:   # bad input: one line, exit 2
        parser.error(str(e))
    kind = "MixtralForCausalLM" if config.use_moe else "LlamaForCausalLM"
    print(f"[tinytron] exported step {meta.get('step', '?')} of {args.checkpoint} as {kind} ({args.dtype}) "
          f"to {args.out}")


if __name__ == "__main__":
    main()
