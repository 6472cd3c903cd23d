"""Pre-train on a real corpus: a `datasets` corpus tokenized once by a `transformers` tokenizer.

    python pretrain_example.py --dataset <hub name or local file> --tokenizer <hub name or folder> ...

The only difference from pretrain_debug.py is `_init_dataset`: this is the template for your data.
"""

from tinytron.data import TokenWindowDataset, prepare_token_shards_distributed
from tinytron.training import ConfigError, Trainer, run
from tinytron.training.arguments import build_parser


class ExampleTrainer(Trainer):
    def _init_dataset(self) -> None:
        d, seq_len = self.config.data, self.config.training.seq_len
        if not d.dataset or not d.tokenizer:
            raise ConfigError("--dataset and --tokenizer are required by pretrain_example.py")
        try:  # bad paths and a tokenizer larger than --vocab_size fail here, before any tokenizing
            path = prepare_token_shards_distributed(
                d.dataset, d.tokenizer, d.data_cache_dir, dataset_config=d.dataset_config or None,
                text_column=d.text_column, val_fraction=d.val_fraction, num_proc=d.tokenize_num_proc,
                vocab_size=self.config.model.vocab_size)
            self.train_dataset = TokenWindowDataset(path, seq_len, "train")
            self.val_dataset = TokenWindowDataset(path, seq_len, "val")
        except ValueError as e:
            raise ConfigError(str(e)) from None


if __name__ == "__main__":
    run(ExampleTrainer, build_parser("Tinytron pre-training on a real corpus"))
