"""Training: the one loop both training scripts share, and what it keeps on disk.

task         the TrainingTask protocol the loop trains (it knows nothing else), and Classifier
loop         fit = start_run, then train_one_epoch and validate_and_save per epoch
accelerator  the Accelerator: precision, accumulation, trackers, the FSDP setups kd refuses
schedule     timm's LR scheduler by name, then the constant fine-tune phase
nonfinite    NaN/inf losses: skipped steps, then a stopped run
topk         the k best checkpoints and best.safetensors
weights      rank 0's buffers for all, whole weights under FSDP, the end-of-run weight check
state        Progress (progress.json) and the resumable state in <run_dir>/last: atomic saves, resume, Ctrl-C
state_files  every file of a saved state checked before anything is unpickled
run_dir      folder checks made before work starts
"""
