#!/usr/bin/env bash
# Multi-node DDP example (run on every node): 2 nodes x 8 GPUs = 16 images per step.
# MASTER_ADDR/MASTER_PORT/NODE_RANK come from your cluster scheduler (SLURM sets them for Lightning).
set -euo pipefail
focaldet fit -c configs/retinanet_r50_fpn_1x_coco.yaml \
  --trainer.num_nodes "${NUM_NODES:-2}" --trainer.devices "${GPUS_PER_NODE:-8}" \
  --data.batch_size 1 "$@"
