"""PairedTransform: one view of RGB and MS together (the same crop, resize and flips for both), then each normalized.

Every draw comes from the sample's own generator (LeafDataset seeds one per (seed, epoch, sample)), so a view is the
same whatever the worker count, after a resume, or when a teacher's output for it is cached.
"""

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors

from kd.data.augment import RandAugment, parse_randaugment

# The version of how a view's pixels are made from a file and its draws: bump it when they change for the same draws
# (2: RGB cropped, resized and flipped in uint8; JPEGs and PNGs decoded by torchvision; 3: the crop drawn by
# torchvision.transforms.v2, whose fallback after 10 misses is its ratio-clamped central crop, not a square), so
# teacher caches key on it.
PIXELS_VERSION = 3


class PairedTransform:
    """Crop/flip RGB and MS with the same parameters (teacher and student see one view), then normalize each.

    `randaugment` (a timm string such as "rand-m9-n2"; "" = off) adds kd.data.augment.RandAugment after the flips, in
    training: its geometric ops move the MS bands with the RGB, its colour ops change the RGB only.
    """

    pixels = PIXELS_VERSION  # how views are made from files (kd.distill.cache keys its logits on it)

    def __init__(
        self,
        image_size: int | None,
        train: bool = False,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        ms_mean=None,
        ms_std=None,
        hflip: float = 0.5,
        vflip: float = 0.0,
        scale_min: float = 1.0,
        randaugment: str = "",
    ):
        self.image_size, self.train = image_size, train
        self.randaugment = randaugment
        spec = parse_randaugment(randaugment) if train else None
        self.rand_augment = RandAugment(spec) if spec else None
        self.mean, self.std = list(mean), list(std)
        self.ms_mean, self.ms_std = ms_mean, ms_std
        self.hflip, self.vflip, self.scale = hflip, vflip, (scale_min, 1.0)

    def __call__(
        self, rgb: torch.Tensor, ms: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict:
        """`rgb` float in [0, 1], or uint8: then, without RandAugment, the RGB crop, resize and flips run on uint8 (a
        quarter of the bytes, and torch's vectorized uint8 resize) and the RGB is made float once, at the output
        size: 1.7x the float path per sample at 224 px from 500 px photos (benchmarks/data_loader.py). MS bands take
        the same geometric steps in float, apart: the RGB view is the same with or without them."""
        uint8 = rgb.dtype == torch.uint8 and self.rand_augment is None
        if rgb.dtype == torch.uint8 and not uint8:
            rgb = TF.to_dtype(rgb, torch.float32, scale=True)
        # one tensor when RGB and MS share a dtype (RandAugment moves them together), else each apart
        parts = [rgb] if ms is None else [rgb, ms] if uint8 else [torch.cat([rgb, ms])]
        height, width = rgb.shape[1:]
        size = [self.image_size] * 2 if self.image_size else [height, width]
        if self.train:
            geometry = v2.Compose(
                [
                    v2.RandomResizedCrop(size, self.scale, (3 / 4, 4 / 3), antialias=True),
                    v2.RandomHorizontalFlip(self.hflip),
                    v2.RandomVerticalFlip(self.vflip),
                ]
            )
            # v2 draws from the global RNG, which cannot be handed a generator: it is set to the sample's own in a
            # fork, so each view stays seeded per sample and the global RNG (dropout's) is left as it was
            with torch.random.fork_rng(devices=[], enabled=generator is not None):
                if generator is not None:
                    torch.default_generator.set_state(generator.get_state())
                views = geometry(*[tv_tensors.Image(x) for x in parts])
                parts = [x.as_subclass(torch.Tensor) for x in (views if len(parts) > 1 else [views])]
                if self.rand_augment is not None:  # uncovered pixels get the mean: they normalize to 0
                    x = parts[0]  # float RGB (+ MS): uint8 is off with RandAugment
                    fill = self.mean + (list(self.ms_mean) if self.ms_mean is not None else [0.0] * (len(x) - 3))
                    parts = [self.rand_augment(x, fill, torch.default_generator)]
        elif [height, width] != size:
            parts = [TF.resize(x, size, antialias=True) for x in parts]
        if uint8:
            parts[0] = TF.to_dtype(parts[0], torch.float32, scale=True)
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        out = {"rgb": TF.normalize(x[:3], self.mean, self.std)}
        if ms is not None:
            out["ms"] = x[3:] if self.ms_mean is None else TF.normalize(x[3:], self.ms_mean, self.ms_std)
        return out
