#!/usr/bin/env bash
# The prepared GPU check: one H100 / H200, under 10 minutes, the machine's own python3 and packages as they are
# (its torch, transformers and peft differ from the pinned test versions; nothing is installed). Each step runs
# under its own time limit and its log goes to $OUT (default /tmp/gpu_check); a failed step is a FAILED row, and
# the rest still run. It prints one table:  bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
TABLE="$LOGS/table.md"
printf '| step | result | last line of its log |\n|---|---|---|\n' > "$TABLE"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8

step() {  # step NAME SECONDS COMMAND...: run it, log to $LOGS/NAME.log, add a table row
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  local last
  last=$(grep -v '^[[:space:]]*$' "$LOGS/$name.log" | tail -n 1 | tr '|' '/' | cut -c1-240)
  local result="ok"
  [ "$rc" -eq 124 ] && result="FAILED (over ${limit} s)"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && result="FAILED (rc $rc)"
  printf '| %s | %s, %d s | %s |\n' "$name" "$result" $((SECONDS - t0)) "$last" >> "$TABLE"
}

step machine 20 "$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__, \
torch.cuda.get_device_name(), f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')"
# the CUDA-only tests (FlexAttention packed rows == padded) and the rest of the performance paths
step cuda_tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_perf_paths.py
step parity 50 "$PY" bench/gpu_parity.py --device cuda
# ours vs transformers + peft, same batch, bf16, activation checkpointing (tokens/s, MFU, peak memory)
step train_mpgui 100 "$PY" bench/train_step.py --size mpgui-stage4 --device cuda --steps 3
step train_qwen 80 "$PY" bench/train_step.py --size qwen2vl-2b --device cuda --steps 3
step decode 60 "$PY" bench/decode.py --size qwen2vl-2b --device cuda --batch 32 --grid 56,96 --reps 2
# train.py itself under torchrun on the GPU: FSDP2 over one rank (NCCL), bf16, 4 steps of a tiny MP-GUI stage
step fsdp_train 60 bash -c "$PY -c 'import sys; sys.path.insert(0, \"tests\"); from test_train import write_dataset; \
print(write_dataset(\"$LOGS/data\"))' && $PY -m torch.distributed.run --standalone --nproc_per_node 1 train.py \
configs/textual.json --base=tests/fixtures/internvl2_tiny --meta=$LOGS/data/meta.json --out=$LOGS/run_fsdp \
--max_steps=4 --global_batch=4 --micro_batch=2 --max_tiles=1 --num_workers=0 && tail -n 1 $LOGS/run_fsdp/metrics.jsonl"
# the dry run's prediction beside the same step run for real (textual.json at its real size, one GPU)
step memory 120 "$PY" tools/dry_run.py configs/textual.json --ranks 1 --gpu_memory_gb 139 --measure \
--out="$LOGS/run_dry"
echo
cat "$TABLE"
