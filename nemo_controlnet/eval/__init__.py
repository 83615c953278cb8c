"""Evaluation: hint-following metrics and the controlnet-eval command."""
