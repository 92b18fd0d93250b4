"""Evaluation: what evaluate.py measures and writes.

metrics      accuracy, confusion, calibration, agreement from logits
measure      latency, throughput, peak memory
report       the results table, per-class recall, the derived comparison lines
plots        confusion matrix, reliability diagram, per-class accuracy (PIL)
corruptions  noise, blur, brightness, JPEG at three severities
"""
