#!/usr/bin/env bash
# Rebuilds tools/tiny_base, the demo's pre-trained tiny InternVL2-layout base (about 70 minutes on 2 cores): the
# world's random-init model, trained in full through train.py on 4,000 screens that are neither training nor
# held-out screens of the demo (world.py --pretrain), in three parts: 2,000 steps of whole-screen grounded captions;
# 1,000 of those captions mixed with region captions and referring expressions; 600 of all these mixed with region
# captions that put each attribute first in turn; each part merged. It stands in for
# InternVL2-8B's own pre-training: no question of an MP-GUI stage or of the benchmark is in it (tiny_base/README.md).
# Usage: bash tools/pretrain_tiny.sh [WORK] (default /tmp/tiny_pretrain, cleared only when this script wrote it).
set -euo pipefail
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then sed -n '2,8s/^# \?//p' "$0"; exit 0; fi
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/tiny_pretrain}
MARK="$WORK/.written-by-pretrain_tiny.sh"
if [ -e "$WORK" ]; then
  [ -f "$MARK" ] || { echo "pretrain_tiny.sh: $WORK exists and was not written by it (no $MARK)" >&2; exit 1; }
  rm -rf "$WORK"
fi
mkdir -p "$WORK" && touch "$MARK"
python tools/world.py "$WORK" 600 100 --pretrain 4000  # the demo's world (same seeds) + 4,000 other screens
FULL=(--mpgui=False --mpgui_mode=textual --init_parts=[] '--train_parts=["vision_model","mlp1","language_model"]'
      --lora_llm_r=0 --lora_llm_alpha=0 --max_tiles=1 --max_length=400 --global_batch=32 --micro_batch=32 --bf16=False
      --num_workers=0 --activation_checkpointing=False --drop_path=0 --lora_dropout=0 --log_every=10
      --betas=[0.9,0.95] --lr=1e-3)
base="$WORK/base"
for part in pretrain:2000 pretrain_region:1000 pretrain_attribute:600; do  # meta name : steps
  name=${part%:*}
  python train.py configs/textual.json --base="$base" --meta="$WORK/data/meta_$name.json" --out="$WORK/run_$name" \
    --max_steps="${part#*:}" --save_every=500 "${FULL[@]}" > "$WORK/train_$name.log" 2>&1 \
    || { tail -20 "$WORK/train_$name.log"; exit 1; }
  python merge.py "$WORK/run_$name" "$WORK/merged_$name"
  base="$WORK/merged_$name"
done
rm -rf tools/tiny_base.new && cp -r "$base" tools/tiny_base.new
cp tools/tiny_base/README.md tools/tiny_base.new/ 2>/dev/null || true  # the provenance, kept
for name in pretrain pretrain_region pretrain_attribute; do  # step, loss and lr of every step, for the curves (tools/plot.py)
  python - "$WORK/run_$name/metrics.jsonl" > "tools/tiny_base.new/${name}_metrics.jsonl" <<'EOF'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    print(json.dumps({k: r[k] for k in ("step", "loss", "lr")}))
EOF
done
rm -rf tools/tiny_base && mv tools/tiny_base.new tools/tiny_base
echo "wrote tools/tiny_base from $base"
