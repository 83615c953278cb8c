"""Inference: sampling with a model family's pipeline, and the controlnet-generate command."""
