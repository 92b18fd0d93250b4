"""Training: the one loop both training scripts share, and what it keeps on disk.

task     the TrainingTask protocol the loop trains (it knows nothing else), and Classifier
loop     fit: Accelerate, AMP, accumulation, clipping, schedules, EMA, QAT, validation, top-k, early stopping
state    the resumable state in <run_dir>/last: atomic saves, checks before anything is unpickled
run_dir  folder checks made before work starts
"""
