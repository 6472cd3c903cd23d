#!/usr/bin/env bash
# Dense 3B model on mock data (multi-GPU, multi-node with NUM_NODES/NODE_RANK/MASTER_ADDR).
source "$(dirname "$0")/../launch.sh"
launch pretrain_debug.py \
  --exp_name gpt_3b \
  --num_layer 36 --num_attention_heads 16 --num_key_value_heads 4 \
  --hidden_size 2048 --intermediate_size 10240 --vocab_size 50304 --block_size 4096 \
  --seq_len 4096 --batch_size 1 --total_batch_size 1048576 \
  --max_steps 10000 --warmup_steps 700 --max_lr 3e-4 --min_lr 3e-5 \
  --val_every_steps 500 --save_every_steps 500 --mock_data_num_samples 3000000 \
  "$@"
