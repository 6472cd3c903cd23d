#!/usr/bin/env bash
# Dense 0.25B debug model on mock data (GPU node).
source "$(dirname "$0")/../launch.sh"
launch pretrain_debug.py \
  --exp_name debug_gpt_0.25b \
  --num_layer 12 --num_attention_heads 32 --num_key_value_heads 4 \
  --hidden_size 1024 --intermediate_size 4096 --vocab_size 50304 --block_size 4096 \
  --seq_len 4096 --batch_size 4 --total_batch_size 524288 \
  --max_steps 1000 --warmup_steps 100 --max_lr 6e-4 --min_lr 6e-5 \
  --val_every_steps 250 --save_every_steps 500 --mock_data_num_samples 200000 \
  "$@"
