#!/usr/bin/env bash
# A two-node data-parallel job in the shape of a cluster launch, both "nodes" on this
# machine: one torchrun agent per node (static rendezvous on node 0's address), one rank
# each, running allreduce_train.py. On a cluster the scheduler starts the same command on
# every node (`srun bash two_agents.sh`); here both agents start in the background.
#
#   bash two_agents.sh PORT [allreduce_train.py options]
set -u
port=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
for node in 0 1; do
    torchrun --nnodes 2 --nproc_per_node 1 --node_rank "$node" \
        --master_addr 127.0.0.1 --master_port "$port" \
        "$here/allreduce_train.py" "$@" &
    pids[node]=$!
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
exit "$status"
