#!/usr/bin/env bash
# Tiny Shakespeare with its byte-level BPE tokenizer (vocab 4096) on CPU: a 2.36M-parameter
# model, one process, under 10 minutes on 2 cores. DATA and TOKENIZER override the local paths.
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}  # one process: let it use every core
MAX_RESTARTS=${MAX_RESTARTS:-0}  # a quick CPU run: report a failure at once instead of retrying
source "$(dirname "$0")/../launch.sh"
DATA=${DATA:-data/tinyshakespeare/input.txt}
TOKENIZER=${TOKENIZER:-data/tinyshakespeare/tokenizer}
HF_HUB_OFFLINE=1 launch pretrain_example.py \
  --dataset "$DATA" --tokenizer "$TOKENIZER" --val_fraction 0.1 \
  --device cpu --precision fp32 --exp_name example_cpu \
  --num_layer 4 --hidden_size 192 --num_attention_heads 6 --num_key_value_heads 2 \
  --intermediate_size 512 --vocab_size 4096 --block_size 256 --dropout 0.1 \
  --seq_len 256 --batch_size 16 --total_batch_size 8192 \
  --max_steps 200 --warmup_steps 20 --max_lr 2e-3 --min_lr 2e-4 --weight_decay 0.1 \
  --val_every_steps 25 --save_every_steps 100 --num_workers 1 \
  "$@"
