#!/usr/bin/env bash
# The whole MP-GUI recipe on a CPU: a synthetic GUI world (tools/world.py) and a tiny InternVL2-layout base
# pre-trained on other screens of it (tools/tiny_base, made by tools/pretrain_tiny.sh), then the five stages in order
# -- train, merge, next -- with the official stage configs, then the final table on held-out screens: each benchmark
# task's score, its shuffled-image control and the majority answer; then OUT/pictures.
# Usage: bash demo.sh [--ablations] [OUT] [SCALE]. SCALE multiplies the steps (default 1; 0.7 is the shortened run
# of tests/test_demo.py). --ablations also runs the paper's ablations in miniature on the same world and budget,
# over two seeds (README, "The CPU demo").
set -euo pipefail
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then sed -n '2,8s/^# \?//p' "$0"; exit 0; fi
cd "$(dirname "$0")"
ABLATIONS=0
if [ "${1:-}" = --ablations ]; then ABLATIONS=1; shift; fi
OUT=${1:-demo}
SCALE=${2:-1}
[[ $SCALE =~ ^[0-9]*\.?[0-9]+$ ]] || { echo "demo.sh: SCALE must be a positive number, got '$SCALE'" >&2; exit 1; }
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
SECONDS=0
python tools/world.py "$OUT" 600 100
rm -rf "$OUT/base" && cp -r tools/tiny_base "$OUT/base"  # the pre-trained base in place of the random one
# What the tiny model changes in the official configs (configs/*.json): one 112-px tile, fp32 on the CPU, no
# regularisers, learning rates for a 3.6M-parameter model (Adam beta2 0.95 keeps them stable), LoRA r32 on the LLM,
# and a step budget per stage (docs/demo.md: how it was chosen).
CPU=(--mpgui=True --max_tiles=1 --max_length=400 --global_batch=16 --micro_batch=16 --bf16=False --num_workers=0
     --activation_checkpointing=False --drop_path=0 --lora_dropout=0 --lora_llm_r=32 --lora_llm_alpha=64 --log_every=10
     --betas=[0.9,0.95])
declare -A STEPS=([textual]=100 [graphical]=200 [spatial]=300 [fusion]=150 [benchmark]=150)
declare -A LR=([textual]=5e-4 [graphical]=1e-3 [spatial]=1e-3 [fusion]=5e-4 [benchmark]=5e-4)
PERCEIVERS='["textual_perceiver","graphical_perceiver","spatial_perceiver"]'

# stage DIR NAME CONFIG DATA BASE STEPS LR [train.py overrides]: trains DIR/runs/NAME with configs/CONFIG.json from
# BASE on the world's meta_DATA.json, prints the loss, merges into DIR/merged/NAME
stage() {
  local dir=$1 name=$2 config=$3 meta=$4 base=$5 lr=$7 steps
  steps=$(awk -v n="$6" -v k="$SCALE" 'BEGIN { n = int(n * k + 0.5); print (n > 0 ? n : 1) }')
  shift 7
  python train.py "configs/$config.json" --base="$base" --meta="$OUT/data/meta_$meta.json" --out="$dir/runs/$name" \
    --max_steps="$steps" --lr="$lr" "${CPU[@]}" "$@" > "$dir/train_$name.log" 2>&1 \
    || { tail -20 "$dir/train_$name.log"; exit 1; }
  python - "$dir/runs/$name/metrics.jsonl" "$name" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
k = max(1, len(rows) // 10)  # mean of the first and the last tenth of the logged steps
avg = lambda r: sum(x["loss"] for x in r) / len(r)
print(f"{sys.argv[2]:10s} {rows[-1]['step']:4d} steps   loss {avg(rows[:k]):.3f} -> {avg(rows[-k:]):.3f}")
EOF
  python merge.py "$dir/runs/$name" "$dir/merged/$name" > "$dir/merge_$name.log" 2>&1 \
    || { tail -20 "$dir/merge_$name.log"; exit 1; }
}

# score DIR MODEL META EVAL [eval.py options]: held-out screens, with the shuffled-image control
score() {
  local dir=$1 model=$2 meta=$3 name=$4
  shift 4
  python eval.py --model "$model" --data "$meta" --out "$dir/$name" --max-tiles 1 --limit 200 --batch-size 50 \
    --shuffled-images "$@" > "$dir/$name.log" 2>&1 || { tail -20 "$dir/$name.log"; exit 1; }
}

# recipe DIR SEED: the five stages; after each of stages 1-4 its own tasks (stages 1-3 with the EXTRA tokens from
# the perceiver they trained: the gate is trained only in stage 4)
recipe() {
  local dir=$1 seed=$2 base="$OUT/base"
  mkdir -p "$dir"
  for s in textual graphical spatial fusion benchmark; do
    stage "$dir" $s $s $s "$base" "${STEPS[$s]}" "${LR[$s]}" --seed="$seed"
    base="$dir/merged/$s"
    if [ $s != benchmark ]; then
      score "$dir" "$base" "$OUT/data/meta_eval_$s.json" "eval_$s" --limit 100 --mpgui-mode $s
      grep majority "$dir/eval_$s.log" | sed 's/^/    /'
    fi
  done
}

recipe "$OUT" 0
echo "final model ($OUT/merged/benchmark), the benchmark tasks on held-out screens:"
score "$OUT" "$OUT/merged/benchmark" "$OUT/data/meta_eval.json" eval
python tools/demo_report.py table "$OUT/eval"
python tools/demo_report.py pictures "$OUT" > /dev/null
echo "demo: $SECONDS s; pictures in $OUT/pictures"
[ $ABLATIONS = 1 ] || exit 0

# The paper's ablations (MP-GUI, arXiv 2503.14021): each variant from the same merged spatial stage of its seed,
# the same steps per stage; one_mix trains everything at once for the five stages' steps together
for seed in 0 1; do
  A="$OUT/ablations"
  full="$A/full/seed$seed"
  if [ $seed = 0 ]; then mkdir -p "$A/full" && ln -s ../.. "$full"; else echo "seed $seed:"; recipe "$full" $seed; fi
  [ $seed = 0 ] || score "$full" "$full/merged/benchmark" "$OUT/data/meta_eval.json" eval
  spatial="$full/merged/spatial"
  d="$A/no_fusion/seed$seed" && mkdir -p "$d"  # stage 4 skipped: the gate learns in stage 5 only
  stage "$d" benchmark benchmark benchmark "$spatial" "${STEPS[benchmark]}" "${LR[benchmark]}" --seed=$seed \
    --train_parts='["fusion_gate"]'
  score "$d" "$d/merged/benchmark" "$OUT/data/meta_eval.json" eval
  d="$A/mean_gate/seed$seed" && mkdir -p "$d"  # the perceivers' mean fills EXTRA in stages 4-5 and at inference
  stage "$d" fusion fusion fusion "$spatial" "${STEPS[fusion]}" "${LR[fusion]}" --seed=$seed --mpgui_mode=mean \
    --train_parts="$PERCEIVERS"
  stage "$d" benchmark benchmark benchmark "$d/merged/fusion" "${STEPS[benchmark]}" "${LR[benchmark]}" --seed=$seed \
    --mpgui_mode=mean
  score "$d" "$d/merged/benchmark" "$OUT/data/meta_eval.json" eval --mpgui-mode mean
  d="$A/one_mix/seed$seed" && mkdir -p "$d"  # no stages: every task of every stage at once, from the base
  total=$(( STEPS[textual] + STEPS[graphical] + STEPS[spatial] + STEPS[fusion] + STEPS[benchmark] ))
  stage "$d" mix fusion mix "$OUT/base" $total "${LR[fusion]}" --seed=$seed \
    --train_parts='["textual_perceiver","graphical_perceiver","spatial_perceiver","fusion_gate"]'
  score "$d" "$d/merged/mix" "$OUT/data/meta_eval.json" eval
done
echo "ablations (the benchmark tasks' scores: mean over seeds 0 and 1, min-max, change from the full recipe):"
python tools/demo_report.py ablations "$OUT/ablations"
echo "demo --ablations: $SECONDS s"
