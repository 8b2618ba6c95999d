# NCCL settings that matter for multi-node iTPN runs; sourced by the launch scripts.
# Override any of them in the environment before launching.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                  # INFO once to check rings/transports
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank fails the job instead of hanging it
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# export NCCL_SOCKET_IFNAME=eth0     # the interface for bootstrap / TCP fallback (set on multi-homed hosts)
# export NCCL_IB_HCA=mlx5            # InfiniBand adapters to use; unset = all
# export NCCL_IB_DISABLE=0           # 1 forces TCP (only for debugging)
# export NCCL_NET_GDR_LEVEL=PHB      # GPUDirect RDMA distance; tune on your topology
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}           # loader workers each decode; keep the CPU oversubscription down
