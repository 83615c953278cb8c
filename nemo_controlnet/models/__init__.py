"""Models: the model families, the locked stack, ControlNets, adapters, and weights on disk."""
