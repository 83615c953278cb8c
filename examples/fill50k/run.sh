#!/usr/bin/env bash
# The controllability proof at tiny scale (see README.md): pretrain a tiny base on the shapes data,
# train a ControlNet over it with the base locked, evaluate with and without control, plot.
# CPU: about 20 minutes on 2 cores. Run from the repository root, after README command 1's setup:
#   bash examples/fill50k/run.sh                 # everything under runs/fill50k and data/fill50k
#   STEPS_SCALE=0.2 bash examples/fill50k/run.sh # a quick look (the targets need the full run)
set -euo pipefail
export HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
WORK=${WORK:-runs/fill50k}
DATA=${DATA:-data/fill50k}
SCALE=${STEPS_SCALE:-1}
steps() { "$PY" -c "print(max(1, round($1 * $SCALE)))"; }
common=(data.shards="$DATA/train" data.validation_shards="$DATA/val"
        data.synthetic.train.out_dir="$DATA/train" data.synthetic.val.out_dir="$DATA/val" logger=csv)

start=$(date +%s)
# 1. the base: text to image, the UNet trained from scratch (no ControlNet in the config)
"$PY" -m nemo_controlnet.cli.train +experiment=fill50k_base run_dir="$WORK/base" "${common[@]}" \
    trainer.max_steps="$(steps 1500)"
# 2. the ControlNet over it, the base locked
"$PY" -m nemo_controlnet.cli.train +experiment=fill50k_controlnet run_dir="$WORK/controlnet" "${common[@]}" \
    model.path="$WORK/base/base" trainer.max_steps="$(steps 600)" validation.every_n_steps="$(steps 100)"
# 3. held-out shapes (another seed), with control and without
"$PY" -m nemo_controlnet.cli.synth dataset.out_dir="$DATA/test" dataset.num_samples=64 dataset.shard_size=64 \
    dataset.resolution=32 dataset.seed=2
"$PY" -m nemo_controlnet.cli.eval controlnet="$WORK/controlnet" shards="$DATA/test" num_samples=64 \
    guidance_scale=3.0 num_inference_steps=20
"$PY" examples/fill50k/plot.py "$WORK/controlnet" --baseline "$WORK/controlnet/eval/metrics.json" \
    --out "$WORK/learning_curve.png"
echo "fill50k: done in $(( $(date +%s) - start )) s; metrics in $WORK/controlnet/eval/metrics.json"
