#!/usr/bin/env bash
# The weakly-supervised pipeline end to end on the generated world (issue #8), every step resumable or cheap to
# redo: CLIMS from image-level labels -> CAM pseudo-masks -> SegViT trained on them -> scored on held-out scenes'
# true masks; then the same SegViT on the true masks of the same training scenes (upper bound).
# About 45 minutes on 2 CPU cores. Results: runs/clims_world/*/cams_metrics.json and the two runs' metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIP=vocabseg/weights/default_clip.safetensors
CLIMS=runs/clims_world/model_final.safetensors
[ -f "$CLIMS" ] || vocabseg train configs/clims_tiny_world.yaml
# CAM quality on 200 held-out scenes (not used for training anything)
vocabseg cams --out runs/clims_world/pseudo_heldout --checkpoint $CLIMS --clip $CLIP --dataset world \
    --world-samples 200 --world-seed 7777777
# pseudo-masks on 1,000 training scenes, and the true masks of 100 held-out scenes in the same class layout
vocabseg cams --out runs/clims_world/pseudo_train --checkpoint $CLIMS --clip $CLIP --dataset world \
    --world-samples 1000 --world-seed 0
vocabseg cams --true-labels --out runs/clims_world/true_val --checkpoint $CLIMS --clip $CLIP --dataset world \
    --world-samples 100 --world-seed 7777777
vocabseg train configs/clims_pseudo_segvit_world.yaml
# upper bound: the same model, scenes and schedule with the true masks
vocabseg cams --true-labels --out runs/clims_world/true_train --checkpoint $CLIMS --clip $CLIP --dataset world \
    --world-samples 1000 --world-seed 0
vocabseg train configs/clims_pseudo_segvit_world.yaml data_root=runs/clims_world/true_train \
    output_dir=runs/clims_true_segvit
