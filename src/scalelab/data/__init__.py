"""Datasets: staging into verified shards, reading them back, node-local copies."""
