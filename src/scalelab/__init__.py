"""scalelab: reproducible distributed deep-learning training and scaling studies on Slurm."""

__version__ = "0.1.0"
