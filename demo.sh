#!/usr/bin/env bash
# The whole MP-GUI recipe on a CPU: a synthetic GUI world and a random-init tiny InternVL2-layout model (tools/world.py),
# then the five stages in order -- train, merge, next -- with the official stage configs, then evaluation on the
# held-out screens. Usage: bash demo.sh [OUT] [SCALE]; SCALE multiplies the steps (default 1: 8.5 min on 2026-11's
# 2-core machine, about 24 min in CI on 2026-12-02).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-demo}
SCALE=${2:-1}
# OUT is cleared for a fresh run only when demo.sh wrote it (its marker file is there) or it is an empty folder:
# anything else there may be someone's work, so stop before writing or deleting anything
MARK="$OUT/.written-by-demo.sh"
if [ -e "$OUT" ] || [ -L "$OUT" ]; then
  if [ -d "$OUT" ] && [ ! -L "$OUT" ] && { [ -f "$MARK" ] || [ -z "$(ls -A "$OUT")" ]; }; then
    rm -rf "$OUT"
  else
    echo "demo.sh: $OUT exists and was not written by demo.sh (no $MARK); give another OUT or move it away" >&2
    exit 1
  fi
fi
mkdir -p "$OUT"
touch "$MARK"
python tools/world.py "$OUT" 600 100
# What the tiny model changes in the official configs (configs/*.json): one 112-px tile, fp32 on the CPU, no
# regularisers, learning rates for a 3.6M-parameter model (Adam beta2 0.95 keeps them stable), LoRA r32 on the LLM,
# and a step budget per stage. Most of the budget goes to the graphical stage: choosing the icon that the question's
# colour names takes some 1,000 steps (README, "The CPU demo").
CPU=(--mpgui=True --max_tiles=1 --max_length=400 --global_batch=32 --micro_batch=32 --bf16=False --num_workers=0
     --activation_checkpointing=False --drop_path=0 --lora_dropout=0 --lora_llm_r=32 --lora_llm_alpha=64 --log_every=10
     --betas=[0.9,0.95])
declare -A STEPS=([textual]=100 [graphical]=1200 [spatial]=100 [fusion]=100 [benchmark]=100)
declare -A LR=([textual]=2e-3 [graphical]=3e-3 [spatial]=2e-3 [fusion]=2e-3 [benchmark]=2e-3)
base="$OUT/base"
for stage in textual graphical spatial fusion benchmark; do
  steps=$(( ${STEPS[$stage]} * SCALE ))
  steps=$(( steps > 0 ? steps : 1 ))
  python train.py "configs/$stage.json" --base="$base" --meta="$OUT/data/meta_$stage.json" --out="$OUT/runs/$stage" \
    --max_steps="$steps" --lr="${LR[$stage]}" "${CPU[@]}" \
    > "$OUT/train_$stage.log" 2>&1 || { tail -20 "$OUT/train_$stage.log"; exit 1; }
  python - "$OUT/runs/$stage/metrics.jsonl" "$stage" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
k = max(1, len(rows) // 10)  # mean of the first and the last tenth of the logged steps
avg = lambda r: sum(x["loss"] for x in r) / len(r)
print(f"{sys.argv[2]:10s} {rows[-1]['step']:4d} steps   loss {avg(rows[:k]):.3f} -> {avg(rows[-k:]):.3f}")
EOF
  python merge.py "$OUT/runs/$stage" "$OUT/merged/$stage" > "$OUT/merge_$stage.log" 2>&1 || { tail -20 "$OUT/merge_$stage.log"; exit 1; }
  base="$OUT/merged/$stage"
  # the stage's own tasks on held-out screens, the EXTRA tokens from the part it trained (a stage is named after it)
  if [ "$stage" != benchmark ]; then
    python eval.py --model "$base" --data "$OUT/data/meta_eval_$stage.json" --out "$OUT/eval_$stage" --max-tiles 1 \
      --limit 100 --batch-size 50 --mpgui-mode "$stage" --shuffled-images > "$OUT/eval_$stage.log" 2>&1 || { tail -20 "$OUT/eval_$stage.log"; exit 1; }
    grep majority "$OUT/eval_$stage.log" | sed 's/^/    /'
  fi
done
echo "final model ($base), every task on held-out screens:"
python eval.py --model "$base" --data "$OUT/data/meta_eval.json" --out "$OUT/eval" --max-tiles 1 --limit 200 --shuffled-images \
  --batch-size 50 > "$OUT/eval.log" 2>&1 || { tail -20 "$OUT/eval.log"; exit 1; }
grep majority "$OUT/eval.log" | sed 's/^/    /'
