#!/usr/bin/env bash
# The dense 0.25B model on FineWeb-Edu with the GPT-2 tokenizer (GPU nodes, needs the hub or a
# local copy: DATASET, DATASET_CONFIG, TOKENIZER and DATA_CACHE_DIR override).
source "$(dirname "$0")/../launch.sh"
DATASET=${DATASET:-HuggingFaceFW/fineweb-edu}
DATASET_CONFIG=${DATASET_CONFIG:-sample-10BT}
TOKENIZER=${TOKENIZER:-gpt2}
DATA_CACHE_DIR=${DATA_CACHE_DIR:-data_cache}
# Tokenize first, in one process over every core, with progress and its token count (a cache hit
# returns at once): inside the job the other ranks would wait for it at a barrier, under the
# process group's timeout, which a 10B-token corpus outlasts.
"$PYTHON" -m tinytron.commands.tokenize --dataset "$DATASET" --dataset_config "$DATASET_CONFIG" \
  --tokenizer "$TOKENIZER" --cache_dir "$DATA_CACHE_DIR" --num_proc "$(nproc)" || exit
launch pretrain_example.py \
  --dataset "$DATASET" --dataset_config "$DATASET_CONFIG" --tokenizer "$TOKENIZER" \
  --data_cache_dir "$DATA_CACHE_DIR" --exp_name example_gpt_0.25b \
  --num_layer 12 --num_attention_heads 32 --num_key_value_heads 4 \
  --hidden_size 1024 --intermediate_size 4096 --vocab_size 50304 --block_size 4096 \
  --seq_len 4096 --batch_size 4 --total_batch_size 524288 \
  --max_steps 19000 --warmup_steps 700 --max_lr 6e-4 --min_lr 6e-5 \
  --val_every_steps 500 --save_every_steps 1000 \
  "$@"
