"""Paired comparison of two recipes on the same test images and seeds, image by image: the per-seed differences give
a mean ± std, resampling the images (one draw for all seeds and both recipes) a bootstrap 95% interval. A difference
is "beyond noise" only when that interval excludes 0 and the seeds agree in sign."""

from dataclasses import dataclass

import torch


@dataclass
class PairedDifference:
    per_seed: list[float]  # accuracy difference a - b of each seed, in points
    mean: float  # their mean, in points
    std: float  # their std over seeds (n - 1), in points; 0 for one seed
    low: float  # bootstrap 2.5% percentile of the mean difference, in points
    high: float  # bootstrap 97.5% percentile
    images: int

    @property
    def beyond_noise(self) -> bool:
        one_sign = all(d > 0 for d in self.per_seed) or all(d < 0 for d in self.per_seed)
        return (self.low > 0 or self.high < 0) and one_sign

    def line(self, a: str, b: str) -> str:
        seeds = len(self.per_seed)
        verdict = "beyond noise" if self.beyond_noise else "within noise"
        return (
            f"{a} vs {b}, paired on the same {self.images} images and {seeds} seed(s): {self.mean:+.1f} ± "
            f"{self.std:.1f} points (per seed {', '.join(f'{d:+.1f}' for d in self.per_seed)}); bootstrap 95% "
            f"interval over images [{self.low:+.1f}, {self.high:+.1f}]: {verdict}"
        )


def paired_difference(
    correct_a: list[torch.Tensor], correct_b: list[torch.Tensor], resamples: int = 10_000, seed: int = 0
) -> PairedDifference:
    """`correct_a[s]`, `correct_b[s]`: whether recipe a's / b's run of seed s got each of N test images right."""
    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError(f"paired runs need the same seeds on both sides, got {len(correct_a)} and {len(correct_b)}")
    a, b = torch.stack(correct_a).double(), torch.stack(correct_b).double()  # [seeds, images]
    differences = (a - b) * 100  # points, image by image
    per_seed = differences.mean(1)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, a.shape[1], (resamples, a.shape[1]), generator=generator)
    resampled = differences.mean(0)[draws].mean(1)  # the mean over seeds of each resample's difference
    low, high = torch.quantile(resampled, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    std = per_seed.std().item() if len(per_seed) > 1 else 0.0
    return PairedDifference(per_seed.tolist(), per_seed.mean().item(), std, low, high, a.shape[1])


def paired_lines(rows: dict[str, dict], groups: dict[str, list[str]]) -> list[str]:
    """A paired line for every two recipes (groups) of one architecture and file kind run on the same images, their
    runs matched by seed (NAME@seed). `rows[name]["correct"]`: per image; `rows[name]["images"]`: which, in order."""
    lines, recipes = [], [g for g in groups if not g.endswith(":last")]
    for i, a in enumerate(recipes):
        for b in recipes[i + 1 :]:
            runs = {g: {name.rpartition("@")[2]: name for name in groups[g]} for g in (a, b)}
            seeds = sorted(set(runs[a]) & set(runs[b]))
            matched = [rows[runs[g][s]] for g in (a, b) for s in seeds]
            same = all(len({r[k] for r in matched}) == 1 for k in ("arch", "kind", "images"))
            if not seeds or not same:
                continue
            correct = {g: [torch.tensor(rows[runs[g][s]]["correct"], dtype=torch.bool) for s in seeds] for g in (a, b)}
            lines.append(paired_difference(correct[a], correct[b]).line(a, b))
    return lines
