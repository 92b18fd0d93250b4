"""RandAugment with timm's `-inc1` ops and magnitudes, not timm's own: every draw comes from the sample's generator
(repeatable runs, resumes, teacher caches), and geometric ops move the MS bands with the RGB, colour ops RGB only."""

import math

import torch
import torchvision.transforms.v2.functional as TF

from kd.config_checks import RandAugmentSpec, parse_randaugment  # noqa: F401 (the string format is the config's)

BILINEAR = TF.InterpolationMode.BILINEAR
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
NO_MAGNITUDE = {"AutoContrast": TF.autocontrast, "Equalize": TF.equalize, "Invert": TF.invert}
ENHANCE = {  # timm's enhancements by a factor 1 ± 0.9 level
    "ColorIncreasing": TF.adjust_saturation,
    "ContrastIncreasing": TF.adjust_contrast,
    "BrightnessIncreasing": TF.adjust_brightness,
    "SharpnessIncreasing": TF.adjust_sharpness,
}
COLOUR = (*NO_MAGNITUDE, "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd", *ENHANCE)
OPS = COLOUR[:3] + GEOMETRIC[:1] + COLOUR[3:] + GEOMETRIC[1:]  # timm's _RAND_INCREASING_TRANSFORMS, in its order


def _negate(value: float, generator: torch.Generator) -> float:
    return -value if torch.rand((), generator=generator) < 0.5 else value


def _colour(op: str, rgb: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    if op in NO_MAGNITUDE:
        return NO_MAGNITUDE[op](rgb)
    if op == "PosterizeIncreasing":  # keep 4 down to 0 of the top bits; 0 bits is black, as in timm
        bits = 4 - int(level * 4)
        return TF.posterize(rgb, bits) if bits > 0 else torch.zeros_like(rgb)
    if op == "SolarizeIncreasing":
        return TF.solarize(rgb, 1.0 - level)
    if op == "SolarizeAdd":  # timm: add up to 110/255 below the mid-level threshold
        return torch.where(rgb < 0.5, (rgb + min(128, int(level * 110)) / 255).clamp(0, 1), rgb)
    return ENHANCE[op](rgb, max(0.1, 1.0 + _negate(level * 0.9, generator)))


def _geometric(op: str, x: torch.Tensor, level: float, fill: list[float], generator: torch.Generator):
    angle, translate, shear = 0.0, [0, 0], [0.0, 0.0]
    if op == "Rotate":
        angle = _negate(level * 30.0, generator)
    elif op in ("ShearX", "ShearY"):  # timm's shear is a factor of the affine matrix; torchvision takes degrees
        degrees = math.degrees(math.atan(_negate(level * 0.3, generator)))
        shear = [degrees, 0.0] if op == "ShearX" else [0.0, degrees]
    else:
        axis = 0 if op == "TranslateXRel" else 1
        translate[axis] = round(_negate(level * 0.45, generator) * x.shape[2 - axis])
    return TF.affine(x, angle=angle, translate=translate, scale=1.0, shear=shear, interpolation=BILINEAR, fill=fill)


class RandAugment:
    """On a float C×H×W stack (RGB, then MS); `fill`: the per-channel value of pixels a geometric op uncovers."""

    def __init__(self, spec: RandAugmentSpec, ops: tuple[str, ...] = OPS):
        unknown = [op for op in ops if op not in OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment op(s) {unknown}; known: {', '.join(OPS)}")
        self.spec, self.ops = spec, tuple(ops)

    def __call__(self, x: torch.Tensor, fill: list[float], generator: torch.Generator) -> torch.Tensor:
        for pick in torch.randint(len(self.ops), (self.spec.num_ops,), generator=generator).tolist():
            if torch.rand((), generator=generator) >= self.spec.prob:
                continue
            magnitude = self.spec.magnitude
            if self.spec.magnitude_std > 0:
                magnitude += self.spec.magnitude_std * torch.randn((), generator=generator).item()
            level, op = min(max(magnitude, 0.0), 10.0) / 10, self.ops[pick]
            if op in GEOMETRIC:
                x = _geometric(op, x, level, fill, generator)
            else:
                x = torch.cat([_colour(op, x[:3], level, generator), x[3:]])
        return x
