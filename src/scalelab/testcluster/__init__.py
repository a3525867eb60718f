"""Multi-node Slurm test cluster in network namespaces."""
