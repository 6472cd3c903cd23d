"""Pre-tokenize a corpus into a Tinytron token cache (before a multi-node launch, see tinytron/data/tokenize.py).

    tinytron-tokenize --dataset web.jsonl --tokenizer gpt2 --cache_dir data_cache [--val_fraction 0.005]
    python -m tinytron.commands.tokenize ...   (the same)

Prints the cache folder and its token count; a second run with the same arguments finds it and
returns at once.
"""

import json

from tinytron.data.tokenize import DEFAULT_NUM_PROC, DEFAULT_VAL_FRACTION, INDEX_FILE, prepare_token_shards
from tinytron.training.arguments import FlagParser


def main(argv: list[str] | None = None) -> None:
    parser = FlagParser(description="Pre-tokenize a corpus into a Tinytron token cache")
    parser.add_argument("--dataset", required=True, help="hub name or local file/folder")
    parser.add_argument("--tokenizer", required=True, help="hub name or local folder")
    parser.add_argument("--cache_dir", required=True, help="where the cache folder goes")
    parser.add_argument("--dataset_config", default=None, help="hub dataset config name")
    parser.add_argument("--text_column", default="text", help="column holding the text")
    parser.add_argument("--split", default="train", help="dataset split to tokenize")
    parser.add_argument("--num_proc", type=int, default=DEFAULT_NUM_PROC)
    parser.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="last fraction of the tokens kept for validation")
    args = parser.parse_args(argv)
    try:
        path = prepare_token_shards(args.dataset, args.tokenizer, args.cache_dir,
                                    dataset_config=args.dataset_config, text_column=args.text_column,
                                    split=args.split, num_proc=args.num_proc,
                                    val_fraction=args.val_fraction)
    except ValueError as e:  # bad paths and values: one line, like the training entry points
        parser.error(str(e))
    tokens = json.loads((path / INDEX_FILE).read_text())["num_tokens"]
    print(f"{path}: {tokens:,} tokens")


if __name__ == "__main__":
    main()
