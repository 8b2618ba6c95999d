#!/usr/bin/env bash
# Many nodes without ssh: run this same command on every node (e.g. from a job scheduler
# that starts one process per node), each with its own NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multi_node_no_ssh.sh RECIPE [key=value ...]
set -euo pipefail
RECIPE=${1:?usage: multi_node_no_ssh.sh RECIPE [overrides...]}; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
source "$(dirname "$0")/nccl_env.sh"
exec deepspeed --no_ssh --nnodes "$NNODES" --node_rank "$NODE_RANK" --num_gpus "$NUM_GPUS" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module itpn.cli.pretrain --config "$RECIPE" "$@"
