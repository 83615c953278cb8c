#!/usr/bin/env bash
# The research options of docs/control_train.md, measured on the fill50k recipe at equal steps: a standard
# ControlNet, the same with controlnet.aux_loss=edge_loss, and a Control-LoRA; each evaluated on the same
# 64 held-out samples as run.sh. Needs run.sh's base (trained here first when missing).
# CPU: about 25 minutes on 2 cores after the base (5 runs of 600 steps, each evaluated). From the repository root:
#   bash examples/fill50k/research.sh            # runs under runs/fill50k/research, table at the end
#   STEPS=300 bash examples/fill50k/research.sh  # fewer steps per run (the same for every run)
#   EXTRA_SEEDS="1 2" bash examples/fill50k/research.sh  # the loss comparison from more seeds
set -euo pipefail
export HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
WORK=${WORK:-runs/fill50k}
DATA=${DATA:-data/fill50k}
STEPS=${STEPS:-600}
OUT="$WORK/research"
common=(data.shards="$DATA/train" data.validation_shards="$DATA/val" data.synthetic.train.out_dir="$DATA/train"
        data.synthetic.val.out_dir="$DATA/val" logger=csv model.path="$WORK/base/base" trainer.max_steps="$STEPS"
        validation.every_n_steps="$STEPS" checkpoint.every_n_steps="$STEPS" resume=false)

if [ ! -f "$WORK/base/base/model_index.json" ]; then  # run.sh step 1: the base, text to image
    "$PY" -m nemo_controlnet.cli.train +experiment=fill50k_base run_dir="$WORK/base" "${common[@]:0:5}" \
        trainer.max_steps=1500
fi
[ -d "$DATA/test" ] || "$PY" -m nemo_controlnet.cli.synth dataset.out_dir="$DATA/test" dataset.num_samples=64 \
    dataset.shard_size=64 dataset.resolution=32 dataset.seed=2

run() {  # name, then overrides: train, time it, evaluate on the held-out shapes
    local name=$1; shift
    local start; start=$(date +%s)
    "$PY" -m nemo_controlnet.cli.train run_dir="$OUT/$name" "${common[@]}" "$@"
    echo "$name: trained in $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
    "$PY" -m nemo_controlnet.cli.eval controlnet="$OUT/$name" shards="$DATA/test" num_samples=64 \
        guidance_scale=3.0 num_inference_steps=20
}
mkdir -p "$OUT"
extra=()
run standard +experiment=fill50k_controlnet
run edge_loss +experiment=fill50k_controlnet controlnet.aux_loss=edge_loss
run control_lora "+experiment=[fill50k_controlnet,control_lora]" adapter.lr=1.0e-3  # the LoRA at the recipe's lr
# the loss comparison again from another seed (the ControlNet's init and the data order change)
for seed in ${EXTRA_SEEDS:-1}; do
    run "standard_seed$seed" +experiment=fill50k_controlnet seed="$seed"
    run "edge_loss_seed$seed" +experiment=fill50k_controlnet controlnet.aux_loss=edge_loss seed="$seed"
    extra+=("standard_seed$seed" "edge_loss_seed$seed")
done
"$PY" examples/fill50k/research_table.py "$OUT" standard edge_loss control_lora "${extra[@]}"
