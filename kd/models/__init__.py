"""Models: timm networks (with offline ImageNet weights) and the RGB+MS HybridFusion, built from an architecture spec,
and their checkpoints (<stem>.safetensors + <stem>.json, checked key by key)."""
