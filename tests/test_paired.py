"""kd/eval/paired.py: the paired difference of two recipes, against hand computations and a numpy bootstrap."""

import numpy as np
import pytest
import torch

from kd.eval.paired import paired_difference, paired_lines


def bools(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def test_per_seed_differences_their_mean_and_std_by_hand():
    a = [bools(1, 1, 1, 0), bools(1, 1, 0, 0), bools(1, 1, 1, 1)]  # 75%, 50%, 100%
    b = [bools(1, 0, 1, 0), bools(1, 1, 0, 0), bools(0, 1, 1, 0)]  # 50%, 50%, 50%
    result = paired_difference(a, b)
    assert result.per_seed == pytest.approx([25.0, 0.0, 50.0])
    assert result.mean == pytest.approx(25.0) and result.std == pytest.approx(25.0)  # sample std of 25, 0, 50
    assert result.images == 4 and not result.beyond_noise  # one seed shows no gain


def test_the_bootstrap_matches_an_independent_numpy_resampling():
    rng = np.random.default_rng(1)
    a = [torch.from_numpy(rng.random(50) < p) for p in (0.8, 0.7, 0.75)]
    b = [torch.from_numpy(rng.random(50) < 0.6) for _ in range(3)]
    result = paired_difference(a, b, resamples=4000, seed=3)
    # the same draws, taken from the same seeded torch generator, averaged with numpy
    draws = torch.randint(0, 50, (4000, 50), generator=torch.Generator().manual_seed(3)).numpy()
    per_image = np.mean([(x.numpy().astype(float) - y.numpy().astype(float)) * 100 for x, y in zip(a, b)], axis=0)
    means = per_image[draws].mean(axis=1)
    assert result.low == pytest.approx(np.quantile(means, 0.025)) and result.high == pytest.approx(
        np.quantile(means, 0.975)
    )
    assert result.low <= result.mean <= result.high


def test_a_recipe_right_where_the_other_is_wrong_is_beyond_noise_and_the_line_says_so():
    a = [torch.ones(40, dtype=torch.bool)] * 3
    b = [torch.arange(40) % 2 == 0] * 3  # 50%
    result = paired_difference(a, b)
    assert result.low > 0 and result.beyond_noise
    line = result.line("distilled", "baseline")
    assert "distilled vs baseline, paired on the same 40 images and 3 seed(s): +50.0 ± 0.0 points" in line
    assert line.endswith("beyond noise") and "interval over images [+" in line


def test_unpaired_runs_are_refused():
    with pytest.raises(ValueError, match="the same seeds on both sides"):
        paired_difference([bools(1)], [bools(1), bools(0)])


def row(correct: list[int], arch: str = "lite0", images: str = "test", kind: str = "pytorch") -> dict:
    return {"correct": correct, "arch": arch, "images": images, "kind": kind}


def test_evaluate_pairs_the_recipes_of_one_architecture_by_seed():
    rows = {
        "teacher": row([1, 1, 1, 1], arch="lite2"),
        "distilled@0": row([1, 1, 1, 0]),
        "distilled@1": row([1, 1, 0, 0]),
        "baseline@0": row([1, 0, 1, 0]),
        "baseline@1": row([1, 1, 0, 0]),
        "baseline@1:last": row([0, 0, 0, 0]),
        "other@0": row([1, 1, 1, 1], images="val"),  # other images: no pair
    }
    groups = {
        "teacher": ["teacher"],
        "distilled": ["distilled@0", "distilled@1"],
        "baseline": ["baseline@0", "baseline@1"],
        "baseline:last": ["baseline@1:last"],
        "other": ["other@0"],
    }
    (line,) = paired_lines(rows, groups)
    expected = paired_difference([bools(1, 1, 1, 0), bools(1, 1, 0, 0)], [bools(1, 0, 1, 0), bools(1, 1, 0, 0)])
    assert line == expected.line("distilled", "baseline") and "+12.5 ± 17.7 points (per seed +25.0, +0.0)" in line


def test_evaluate_refuses_zero_timed_runs_in_one_line(capsys):
    import evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--demo", "--latency-runs", "0", "--models", "x=nowhere.safetensors"])
    assert exit_info.value.code == 2 and "--latency-runs must be >= 1" in capsys.readouterr().err
