"""Pre-train on a real corpus: a `datasets` corpus tokenized once by a `transformers` tokenizer.

    python pretrain_example.py --dataset <hub name or local file> --tokenizer <hub name or folder> ...

Several corpora blend by weight: `--dataset web.jsonl,code.jsonl --dataset_weights 0.7,0.3`
(tinytron/data/blend.py; `--dataset_config` and `--text_column` take one value for all corpora or
a comma-separated value per corpus).

The only difference from pretrain_debug.py is `_init_dataset`: this is the template for your data.
"""

from torch.utils.data import ConcatDataset

from tinytron.data import TokenWindowDataset, prepare_token_shards_distributed
from tinytron.data.blend import BlendedDataset, parse_list, parse_weights
from tinytron.training import ConfigError, Trainer, run
from tinytron.training.arguments import build_parser


class ExampleTrainer(Trainer):
    def _init_dataset(self) -> tuple:
        d, seq_len = self.config.data, self.config.training.seq_len
        if not d.dataset or not d.tokenizer:
            raise ConfigError("--dataset and --tokenizer are required by pretrain_example.py")
        try:
            # Every flag is checked before any corpus is tokenized (and on every rank).
            names = [n.strip() for n in d.dataset.split(",")]
            if not all(names):
                raise ValueError(f"--dataset {d.dataset!r} has an empty comma-separated entry")
            weights = parse_weights(d.dataset_weights, len(names))
            configs = parse_list(d.dataset_config, len(names), "dataset_config")
            columns = parse_list(d.text_column, len(names), "text_column")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        train, val = [], []
        for name, config, column in zip(names, configs, columns):
            try:  # bad paths and a tokenizer larger than --vocab_size fail here, before any tokenizing
                path = prepare_token_shards_distributed(
                    name, d.tokenizer, d.data_cache_dir, dataset_config=config or None, text_column=column,
                    val_fraction=d.val_fraction, num_proc=d.tokenize_num_proc,
                    vocab_size=self.config.model.vocab_size)
                train.append(TokenWindowDataset(path, seq_len, "train"))
                val.append(TokenWindowDataset(path, seq_len, "val"))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if len(names) == 1:
            return train[0], val[0]
        return BlendedDataset(train, weights), ConcatDataset(val)


if __name__ == "__main__":
    run(ExampleTrainer, build_parser("Tinytron pre-training on a real corpus"))
