"""Training: the one model definition (imported by the worker), data, losses, stages, evaluation."""
