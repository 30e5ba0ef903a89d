#!/usr/bin/env bash
# The whole chain on a CPU (minutes on 2 cores): synthetic DOTA-format data -> JEPA pretraining with
# object-aware masking -> DETR-style fine-tuning -> the evaluation table. Every step is a plain command you can
# copy; on a GPU drop --device cpu and raise the sizes.
set -euo pipefail
cd "$(dirname "$0")"
python prepare.py synth --out data/synthetic
python pretrain.py --data synthetic --model mini --img-size 128 --patch-size 8 --epochs 40 --batch-size 32 \
    --lr 1e-3 --warmup-epochs 4 --mask object --device cpu --workers 1 --out runs/demo/pretrain
python finetune.py --ckpt runs/demo/pretrain/last.pt --img-size 128 --epochs 20 --batch-size 16 \
    --eval-every 5 --device cpu --workers 1 --out runs/demo/finetune
python evaluate.py --ckpt runs/demo/finetune/best.pt --device cpu --workers 1 --json runs/demo/eval.json
