#!/usr/bin/env bash
# A laptop/CPU run: 2 processes on gloo, a tiny model on mock data, about a minute.
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MAX_RESTARTS=${MAX_RESTARTS:-0}  # a quick CPU run: report a failure at once instead of retrying
source "$(dirname "$0")/../launch.sh"
launch pretrain_debug.py \
  --device cpu --precision fp32 --exp_name debug_cpu \
  --num_layer 2 --hidden_size 128 --num_attention_heads 4 --num_key_value_heads 2 \
  --intermediate_size 512 --vocab_size 512 --block_size 128 \
  --seq_len 128 --batch_size 8 --total_batch_size 4096 \
  --max_steps 60 --warmup_steps 10 --max_lr 3e-3 --min_lr 3e-4 \
  --val_every_steps 20 --save_every_steps 30 --mock_data_num_samples 4000 --num_workers 1 \
  "$@"
