#!/usr/bin/env bash
# Many nodes from one launching node over ssh/pdsh: every host in HOSTFILE must reach the
# others and see the same code and data paths.
#   HOSTFILE=launch/hostfile launch/multi_node_hostfile.sh RECIPE [key=value ...]
set -euo pipefail
RECIPE=${1:?usage: multi_node_hostfile.sh RECIPE [overrides...]}; shift
HOSTFILE=${HOSTFILE:-launch/hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}
source "$(dirname "$0")/nccl_env.sh"
# The launcher forwards variables listed in ~/.deepspeed_env (and NCCL_*/PYTHON* ones) to every node.
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module itpn.cli.pretrain --config "$RECIPE" "$@"
