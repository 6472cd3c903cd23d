#!/usr/bin/env bash
# The dense 0.25B model on FineWeb-Edu with the GPT-2 tokenizer (GPU nodes, needs the hub or a
# local copy: DATASET, DATASET_CONFIG and TOKENIZER override).
source "$(dirname "$0")/../launch.sh"
launch pretrain_example.py \
  --dataset "${DATASET:-HuggingFaceFW/fineweb-edu}" --dataset_config "${DATASET_CONFIG:-sample-10BT}" \
  --tokenizer "${TOKENIZER:-gpt2}" --exp_name example_gpt_0.25b \
  --num_layer 12 --num_attention_heads 32 --num_key_value_heads 4 \
  --hidden_size 1024 --intermediate_size 4096 --vocab_size 50304 --block_size 4096 \
  --seq_len 4096 --batch_size 4 --total_batch_size 524288 \
  --max_steps 19000 --warmup_steps 700 --max_lr 6e-4 --min_lr 6e-5 \
  --val_every_steps 500 --save_every_steps 1000 \
  "$@"
