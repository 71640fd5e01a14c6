"""The paper in plain PyTorch: models, losses, the history buffer and Algorithm 1. No Ray, no DeepSpeed."""
