"""Training: the recipe both trainers share, DeepSpeed engines, the Ray Train worker loop and driver."""
