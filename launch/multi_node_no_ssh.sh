#!/usr/bin/env bash
# Many nodes without ssh: run this same command on every node (e.g. from a job scheduler
# that starts one process per node), each with its own NODE_RANK. HOSTFILE lists the nodes
# in the same order on every node (see hostfile.example); the first one is the master.
#   HOSTFILE=launch/hostfile NODE_RANK=0 launch/multi_node_no_ssh.sh RECIPE [key=value ...]
set -euo pipefail
RECIPE=${1:?usage: multi_node_no_ssh.sh RECIPE [overrides...]}; shift
: "${HOSTFILE:?set HOSTFILE}" "${NODE_RANK:?set NODE_RANK}"
MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^#' "$HOSTFILE" | head -n1 | awk '{print $1}')}
source "$(dirname "$0")/nccl_env.sh"
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module itpn.cli.pretrain --config "$RECIPE" "$@"
