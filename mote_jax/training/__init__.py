"""Optimizer, train loop, checkpoints and metrics; generic over the objective."""
