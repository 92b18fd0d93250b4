import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.data import make_demo_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A small demo set (8/4/4 images per class, 32 px) shared by the tests that need files on disk."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=1, per_class=(8, 4, 4), size=32)
