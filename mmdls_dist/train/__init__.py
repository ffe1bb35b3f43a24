"""Training on Ray Train: the per-worker loop (loop.py), the TorchTrainer around it
(launch.py), losses, checkpoints, the torch.distributed adapter, TensorBoard logging and
Ray Tune sweeps (tune.py). Nothing is imported here: evaluation reads checkpoints
(checkpoint.py) without importing the loop or Ray."""
