"""The model as serving needs it: backbones, network, checkpoint, inference, registry."""
