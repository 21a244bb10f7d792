"""Evaluation: benchmark loaders, metrics, baselines, and the `memo eval` harness."""
