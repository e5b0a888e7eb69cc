import numpy as np
import pytest
import torch

from glipv2.config import get_preset
from glipv2.text import Tokenizer

# Under CI=true a skip for a missing build step fails (tests/ci_skips.py).
pytest_plugins = ["tests.ci_skips"]


@pytest.fixture(scope="session")
def small_cfg():
    """The tiny preset at 128 px: the real architecture, sized for fast CPU tests."""
    return get_preset("tiny").replace(image_hw=(128, 128))


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer()


@pytest.fixture()
def small_model(small_cfg):
    from glipv2.modeling.glipv2 import build_model

    torch.manual_seed(0)
    return build_model(small_cfg)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    np.random.seed(0)
