"""Evaluation, what evaluate.py measures and writes: metrics from logits, speed and memory (measure), the report and
its plots, the paired comparison of two recipes, and corruptions for robustness."""
