"""PairedTransform: the same crop, resize and flips for RGB and MS, then each normalized; every draw comes from the
sample's own generator (LeafDataset seeds one per (seed, epoch, sample))."""

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors

from kd.data.augment import RandAugment, parse_randaugment

# How a view's pixels are made from a file and its draws (teacher caches key on it): bump it when they change. 2: RGB
# cropped etc. in uint8, JPEG/PNG decoded by torchvision; 3: the crop drawn by torchvision.transforms.v2.
PIXELS_VERSION = 3


class PairedTransform:
    """`randaugment` (a timm string such as "rand-m9-n2"; "" = off): kd.data.augment.RandAugment after the flips."""

    pixels = PIXELS_VERSION

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
        self.geometries: dict[tuple[int, int], v2.Compose] = {}  # per output size: building one per view cost ~10%

    def __call__(
        self, rgb: torch.Tensor, ms: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict:
        """`rgb` float in [0, 1], or uint8: then, without RandAugment, RGB is cropped, resized and flipped in uint8 and
        made float at the output size (1.7x faster, benchmarks/data_loader.py); MS takes the same steps in float."""
        uint8 = rgb.dtype == torch.uint8 and self.rand_augment is None
        if rgb.dtype == torch.uint8 and not uint8:
            rgb = TF.to_dtype(rgb, torch.float32, scale=True)
        # one tensor when RGB and MS share a dtype (RandAugment moves them together), else each apart
        parts = [rgb] if ms is None else [rgb, ms] if uint8 else [torch.cat([rgb, ms])]
        height, width = rgb.shape[1:]
        size = [self.image_size] * 2 if self.image_size else [height, width]
        if self.train:
            if (geometry := self.geometries.get(tuple(size))) is None:  # building draws nothing: same views
                crop = v2.RandomResizedCrop(size, self.scale, (3 / 4, 4 / 3), antialias=True)
                geometry = v2.Compose([crop, v2.RandomHorizontalFlip(self.hflip), v2.RandomVerticalFlip(self.vflip)])
                self.geometries[tuple(size)] = geometry
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
