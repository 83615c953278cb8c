"""Offline data work: sources -> shards + manifest (hints, cached encodings, synthetic data), as a job."""
