"""Common corruptions for robustness (noise, blur, brightness, JPEG) at severities 1..3, on un-normalized images."""

import math

import torch
import torchvision.transforms.v2.functional as TF

# Severities 1..3 of each corruption. Noise, brightness and JPEG take ImageNet-C's values (Hendrycks & Dietterich,
# 2019); the blur sigma is ImageNet-C's at 224 px, scaled to the image size (sigma · size / 224).
CORRUPTIONS = {
    "gaussian_noise": (0.08, 0.12, 0.18),  # standard deviation of the added noise, image in [0, 1]
    "gaussian_blur": (1.0, 2.0, 3.0),  # sigma in pixels at 224 px
    "brightness": (0.1, 0.2, 0.3),  # added to every channel (ImageNet-C adds it to the HSV value), then clipped
    "jpeg": (80, 65, 58),  # JPEG quality
}


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption `name` at `severity` (1..3) to images in [0, 1] (B×3×H×W); the noise is seeded."""
    level = CORRUPTIONS[name][severity - 1]
    if name == "gaussian_noise":
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed * 10 + severity))
        out = images + level * noise
    elif name == "gaussian_blur":
        sigma = level * images.shape[-1] / 224
        out = TF.gaussian_blur(images, [2 * math.ceil(3 * sigma) + 1] * 2, [sigma, sigma])
    elif name == "brightness":
        out = images + level
    else:
        as_bytes = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        out = TF.jpeg(as_bytes, int(level)).float() / 255
    return out.clamp(0, 1)


def corrupt_normalized(
    rgb: torch.Tensor, mean: list[float], std: list[float], name: str, severity: int, seed: int = 0
) -> torch.Tensor:
    """Un-normalize a model's RGB batch with its mean/std, corrupt it, normalize it again."""
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (mean, std))
    return (corrupt(rgb * std + mean, name, severity, seed) - mean) / std
