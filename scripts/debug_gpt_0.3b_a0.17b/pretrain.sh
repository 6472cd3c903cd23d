#!/usr/bin/env bash
# MoE debug model on mock data (GPU node): 12 layers, 8 experts of width 768, top-2.
# With SEP_SIZE=N the experts are split over N GPUs (and attention runs Ulysses over them).
source "$(dirname "$0")/../launch.sh"
launch pretrain_debug.py \
  --exp_name debug_gpt_0.3b_a0.17b \
  --num_layer 12 --num_attention_heads 32 --num_key_value_heads 4 \
  --hidden_size 768 --intermediate_size 3072 --vocab_size 50304 --block_size 4096 \
  --use_moe --num_experts 8 --num_experts_per_tok 2 --moe_intermediate_size 768 \
  --seq_len 4096 --batch_size 4 --total_batch_size 524288 \
  --max_steps 1000 --warmup_steps 100 --max_lr 6e-4 --min_lr 6e-5 \
  --val_every_steps 250 --save_every_steps 500 --mock_data_num_samples 200000 \
  "$@"
