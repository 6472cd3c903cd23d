#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2329  # backquotes are markdown; the checks run through `check`
# The checks of docs/benchmarks.md ("Still to run on GPUs") that one GPU can run, in one go, in
# under 8 minutes on one H100/H200; every figure goes to one markdown file.
#
#   bash benchmarks/gpu.sh [RESULTS.md]      (default: gpu_results.md; the full output: RESULTS.md.log)
#
# One check failing does not stop the others: its section says FAILED with the exit code, and
# the script exits 1 at the end. Not run here, since they need two or more GPUs: overlap on NCCL
# and --fsdp (ignored at world size 1: nothing to shard).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=$(realpath -m "${1:-gpu_results.md}")
log="$out.log"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export NPROC_PER_NODE=1 MAX_RESTARTS=0 PYTHONUNBUFFERED=1
failed=0
: > "$out"
: > "$log"
{
  echo "# GPU checks ($(date -u +%F))"
  echo
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "- torch $(python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
} >> "$out"

# check TITLE COMMAND...: run it, its output to the log, its time and status to the results.
check() {
  local title=$1 start rc
  shift
  printf '\n## %s\n\n`%s`\n\n' "$title" "$*" >> "$out"
  echo "=== $title: $*" >> "$log"
  start=$(date +%s)
  "$@" >> "$log" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "FAILED (exit $rc); see $log" >> "$out"
    failed=1
  fi
  echo "($(($(date +%s) - start)) s)" >> "$out"
}

# The 0.25B debug script with one micro-batch of 4 x 4096 per step (the preset's memory, fewer
# tokens): `small_run LOG_DIR FLAGS...`.
small_run() {
  local dir=$1
  shift
  bash scripts/debug_gpt_0.25b/pretrain.sh --total_batch_size 16384 --no-do_val --log_dir "$dir" "$@"
}

# `figures LOG_DIR`: the last step's figures from the run's metrics.jsonl.
figures() {
  python - "$1" >> "$out" <<'EOF'
import glob, json, sys
(path,) = glob.glob(f"{sys.argv[1]}/*/metrics.jsonl")
r = [json.loads(line) for line in open(path)][-1]
print(f"step {r['step']}: {r['perf/step_time_s']:.3f} s, {r['perf/tokens_per_s']:,.0f} tokens/s, "
      f"MFU {100 * (r['perf/mfu'] or 0):.1f}%, peak allocated {r['perf/peak_memory_gib']:.2f} GiB, "
      f"loss {r['train/loss']:.4f}\n")
EOF
}

# `trainer_run NAME FLAGS...`: 8 steps of the 0.25B script with FLAGS (the last step's figures).
trainer_run() {
  local name=$1
  shift
  small_run "$tmp/$name" --max_steps 8 --warmup_steps 2 --no-do_save "$@" && figures "$tmp/$name"
}

# `peak_and_plan AC`: eager peak memory of 2 steps at --activation_checkpointing AC vs the plan.
peak_and_plan() {
  small_run "$tmp/mem_$1" --max_steps 2 --warmup_steps 1 --no-do_save --activation_checkpointing "$1" || return
  figures "$tmp/mem_$1" || return
  echo '```' >> "$out"
  tinytron-plan --num_layer 12 --num_attention_heads 32 --num_key_value_heads 4 --hidden_size 1024 \
    --intermediate_size 4096 --vocab_size 50304 --block_size 4096 --seq_len 4096 --batch_size 4 \
    --total_batch_size 16384 --activation_checkpointing "$1" --world_size 1 >> "$out" || return
  echo '```' >> "$out"
}

# SIGTERM to the whole job (as a scheduler sends it) after a few steps, twice: the second run of
# the same command resumes the step the first saved. `preempted_run NAME STEP_PATTERN`.
preempted_run() {
  local start rc pid
  setsid bash scripts/debug_gpt_0.25b/pretrain.sh --total_batch_size 16384 --no-do_val --max_steps 1000 \
    --save_every_steps 1000 --log_dir "$tmp/preempt" > "$tmp/$1.out" 2>&1 &
  pid=$!
  for _ in $(seq 900); do grep -Eq "$2" "$tmp/$1.out" && break; sleep 0.2; done
  start=$(date +%s.%N)
  kill -TERM -- "-$pid"
  wait "$pid"
  rc=$?
  cat "$tmp/$1.out" >> "$log"
  echo "$1: SIGTERM to the job, exit $rc after $(python -c "import time; print(f'{time.time() - $start:.1f}')") s" \
    "(torchrun's grace period: 30 s); $(grep -Eo 'resumed from .* at step [0-9]+' "$tmp/$1.out" | sed 's|.*/||')" \
    "$(grep -Eo 'SIGTERM: saved step [0-9]+' "$tmp/$1.out")" >> "$out"
  echo >> "$out"
  return "$rc"
}

preempt_and_resume() {
  preempted_run first 'step +5 \|' && preempted_run rerun 'step +8 \|'
}

check "Throughput vs transformers (bf16, compiled)" \
  python -m benchmarks.throughput --device cuda --dtype bf16 --preset 0.25b --compile --append "$out"
check "MFU (bf16, compiled, flash SDPA)" \
  python -m benchmarks.mfu --device cuda --dtype bf16 --preset 0.25b --compile --append "$out"
check "bf16 vs fp32, dense (100 steps)" python -m benchmarks.bf16 --device cuda --append "$out"
check "bf16 vs fp32, MoE (100 steps)" python -m benchmarks.bf16 --moe --device cuda --append "$out"
check "Memory plan vs eager, no recompute" peak_and_plan none
check "Memory plan vs eager, full recompute" peak_and_plan full
check "Preemption and resume on CUDA" preempt_and_resume
check "Trainer, 0.25B, AdamW (compiled)" trainer_run adamw --use_compile
check "Trainer, 0.25B, --optimizer muon (compiled)" trainer_run muon --use_compile --optimizer muon
check "Trainer, 0.25B, --document_mask (flex_attention, compiled)" \
  trainer_run docmask --use_compile --document_mask --eos_token_id 3
check "Document mask step time (flex_attention vs causal SDPA)" \
  python -m benchmarks.document_mask --device cuda --dtype bf16 --preset 0.25b --append "$out"

echo "results: $out (log: $log)"
exit "$failed"
