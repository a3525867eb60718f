"""Communication benchmark (allreduce, allgather, broadcast) and scaling prediction."""
