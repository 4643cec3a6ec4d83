"""Training of the VisionSelector scorer: differentiable top-k, loss and schedules."""
