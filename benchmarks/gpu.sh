#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2329  # backquotes are markdown; the checks run through `check`
# The GPU checks one GPU can run, in one go, in under 7 minutes on one H100/H200: the `cuda` test
# tier first (every test marked `cuda`), then the figures of docs/benchmarks.md ("GPU"), most
# wanted first, every figure to one markdown file. Runs on a stock CUDA image as it is: torch and transformers, no `datasets`, no
# install of this repository (run from its root), `python3` only.
#
#   bash benchmarks/gpu.sh [RESULTS.md]      (default: gpu_results.md; the full output: RESULTS.md.log)
#
# One check failing does not stop the others: its section says FAILED with the exit code, and
# the script exits 1 at the end. Each check has a time limit (`timeout`), so one hang costs its
# limit only. Not run here, since they need two or more GPUs: overlap on NCCL and --fsdp.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=$(realpath -m "${1:-gpu_results.md}")
log="$out.log"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export NPROC_PER_NODE=1 MAX_RESTARTS=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TINYTRON_PYTHON=${TINYTRON_PYTHON:-python3}
failed=0
: > "$out"
: > "$log"
{
  echo "# GPU checks ($(date -u +%F))"
  echo
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "- torch $(python3 -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
} >> "$out"

# check TITLE SECONDS COMMAND...: run it (killed after SECONDS), its output to the log, its time and
# status to the results.
check() {
  local title=$1 limit=$2 start rc
  shift 2
  printf '\n## %s\n\n`%s`\n\n' "$title" "$*" >> "$out"
  echo "=== $title: $*" >> "$log"
  start=$(date +%s)
  timeout "$limit" bash -c '"$@"' "$title" "$@" >> "$log" 2>&1   # a new bash: the functions are exported
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ": over its $limit s")); see $log" >> "$out"
    failed=1
  fi
  echo "($(($(date +%s) - start)) s)" >> "$out"
}

# `figures LOG_DIR`: the last step's figures from the run's metrics.jsonl.
figures() {
  python3 - "$1" >> "$out" <<'EOF'
import glob, json, sys
(path,) = glob.glob(f"{sys.argv[1]}/*/metrics.jsonl")
r = [json.loads(line) for line in open(path)][-1]
print(f"step {r['step']}: {r['perf/step_time_s']:.3f} s, {r['perf/tokens_per_s']:,.0f} tokens/s, "
      f"MFU {100 * (r['perf/mfu'] or 0):.1f}%, peak allocated {r['perf/peak_memory_gib']:.2f} GiB, "
      f"loss {r['train/loss']:.4f}\n")
EOF
}

# `trainer NAME FLAGS...`: 10 steps of pretrain_debug.py (one process, mock data) with FLAGS, one
# micro-batch per step; the last step's figures (compilation and warm-up are in the first steps).
trainer() {
  local name=$1
  shift
  python3 pretrain_debug.py --device cuda --max_steps 10 --warmup_steps 2 --no-do_val --no-do_save \
    --mock_data_num_samples 2000 --log_dir "$tmp/$name" "$@" && figures "$tmp/$name"
}
GPT2=(--num_layer 12 --hidden_size 768 --num_attention_heads 12 --num_key_value_heads 12 --intermediate_size 2048
      --vocab_size 50304 --block_size 1024 --seq_len 1024 --batch_size 16 --total_batch_size 16384 --tied_lm_head)
P025=(--num_layer 12 --num_attention_heads 32 --num_key_value_heads 4 --hidden_size 1024 --intermediate_size 4096
      --vocab_size 50304 --block_size 4096 --seq_len 4096 --batch_size 4 --total_batch_size 16384)
P1B=(--num_layer 16 --hidden_size 2048 --num_attention_heads 16 --num_key_value_heads 4 --intermediate_size 8192
     --vocab_size 50304 --block_size 4096 --seq_len 4096 --batch_size 2 --total_batch_size 8192)

# `peak_and_plan AC FLAGS...`: the eager peak of a run with FLAGS at --activation_checkpointing AC (a
# process of its own: cuBLAS's workspaces included) vs the plan.
peak_and_plan() {
  local mode=$1
  shift
  trainer "mem_$mode" "$@" --max_steps 2 --warmup_steps 1 --activation_checkpointing "$mode" || return
  {
    echo '```'
    python3 -m tinytron.commands.plan "$@" --activation_checkpointing "$mode" --world_size 1
    echo '```'
  } >> "$out"
}

export out tmp
export -f figures trainer peak_and_plan
# -o addopts="": pyproject's pytest-xdist options, for an image without the dev extra (no pytest-xdist).
check "cuda test tier" 200 python3 -m pytest -o addopts="" -m cuda -q -rP -p no:cacheprovider tests/
check "Trainer, 0.25B preset (head_dim 32), --use_compile" 75 trainer p025 "${P025[@]}" --use_compile
check "Trainer, GPT-2 124M shape (SwiGLU 2048, tied), --use_compile" 75 trainer gpt2 "${GPT2[@]}" --use_compile
check "Peers: GPT-2 124M shape vs transformers' GPT2LMHeadModel (bf16, both compiled whole)" 150 \
  python3 -m benchmarks.peers --device cuda --preset gpu --pair gpt2 --warmup 3 --steps 8 --append "$out"
check "Memory plan vs eager, 0.25B, no recompute" 45 peak_and_plan none "${P025[@]}"
check "Memory plan vs eager, 0.25B, full recompute" 45 peak_and_plan full "${P025[@]}"
check "Step profile, 0.25B (bf16, eager)" 60 \
  python3 -m benchmarks.step_profile --device cuda --dtype bf16 --preset 0.25b --warmup 2 --steps 3 --append "$out"
check "Trainer, 1B (16 x 2048, head_dim 128, kv 4), --use_compile" 90 trainer p1b "${P1B[@]}" --use_compile

echo "results: $out (log: $log)"
exit "$failed"
