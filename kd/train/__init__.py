"""Training: the one loop both training scripts share (loop.fit trains a task.TrainingTask), and what it keeps on
disk (state: the resumable state; topk: the best checkpoints; run_dir: folder checks)."""
