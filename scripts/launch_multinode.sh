#!/usr/bin/env bash
# Multi-node DDP example (run on every node): 2 nodes x 8 GPUs = 16 images per step.
# MASTER_ADDR/MASTER_PORT/NODE_RANK come from your cluster scheduler (SLURM sets them for Lightning);
# by hand: MASTER_ADDR=<node 0's address> MASTER_PORT=<free port> NODE_RANK=<0..N-1> WORLD_SIZE=<N x GPUs>.
# docs/training.md "Multi-GPU, AMP" (several machines); tests/test_ddp.py runs 2 one-process "nodes" on 127.0.0.1.
set -euo pipefail
focaldet fit -c configs/retinanet_r50_fpn_1x_coco.yaml \
  --trainer.num_nodes "${NUM_NODES:-2}" --trainer.devices "${GPUS_PER_NODE:-8}" \
  --data.batch_size 1 "$@"
