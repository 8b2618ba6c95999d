#!/usr/bin/env bash
# One node, all its GPUs:  launch/single_node.sh RECIPE [key=value ...]
#   e.g. launch/single_node.sh clip_l14_224_300e data.train=/data/in1k/train
set -euo pipefail
RECIPE=${1:?usage: single_node.sh RECIPE [overrides...]}; shift
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
source "$(dirname "$0")/nccl_env.sh"
exec deepspeed --num_gpus "$NUM_GPUS" --module itpn.cli.pretrain --config "$RECIPE" "$@"
