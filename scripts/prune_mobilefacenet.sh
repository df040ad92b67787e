#!/usr/bin/env bash
# The real MobileFaceNet of ../shared pruned to half its MACs with the toolkit's best measured recipe
# (README: "Keeping the accuracy"): per-group ratios from a sensitivity analysis, every cut group's consumers
# refitted by least squares towards the unpruned net, every block then fitted to the unpruned block's output
# (--blockfit-epochs), then distillation fine-tuning with Caffe's solver of the embedding and of the cosines
# between the faces of each batch (--distill-similarity).
# Samples and trains only on LFW folds 1-5 people and people in no pair; evaluates on folds 6-10.
# Report and plots in runs/mobilefacenet (or --out DIR); the report's verify stage (python -m prune.verify) runs the
# pruned net beside the original in Caffe, OpenCV DNN and MNN: deviation from Caffe, batch-1 latency, speed-up.
# Add --runtime mnn (or opencv, caffe) to rank the allocation's cuts by measured time there, --round-to 8 for
# channel counts in multiples of 8. Every flag of python -m apps.pipeline can be added,
# e.g. --macs-target 0.35, --finetune-epochs-final 0 (closed-form steps only), --model/--weights of your own net.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SPHEREFACE_SHARED:-$(cd .. && pwd)/shared}"
MFN="$SHARED/models/mobilefacenet/mobilefacenet-v0"
exec .venv/bin/python -m apps.pipeline --model "$MFN.prototxt" --weights "$MFN.caffemodel" --blob fc1 --rgb \
    --macs-target 0.5 --train-unpaired --images 1024 --blockfit-epochs 16 \
    --finetune-epochs-per-layer 0 --finetune-epochs-final 8 --distill-similarity 10 --similarity-hard 4 --finetune-lr 0.01 --finetune-lr-steps 0.6,0.85 \
    --finetune-mirror --no-flip --eval-steps last --out runs/mobilefacenet "$@"
