import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.data.demo import make_demo_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A small demo set (8/4/4 images per class, 32 px) shared by the tests that need files on disk."""
    root = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(root, seed=1, per_class=(8, 4, 4), size=32, unlabeled_per_class=0)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide singletons, so each training run in one pytest process starts fresh."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()
