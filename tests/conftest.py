import os
import random

import numpy as np
import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "official_itpn")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def fixtures_dir():
    path = os.environ.get("ITPN_FIXTURES", FIXTURES)
    if not os.path.isdir(path):
        pytest.fail(f"reference fixtures not found at {path} (set ITPN_FIXTURES)")
    return path
