"""Training: data readers, losses, samplers, stages, evaluation, the `train`/`evaluate`/`promote` commands."""
