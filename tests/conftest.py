import os
from pathlib import Path

import pytest

# the test machines have no network: never let transformers or datasets try the hub
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"  # large real data, beside the checkout; absent on a user's clone


@pytest.fixture
def shared_data():
    if not SHARED.is_dir():
        pytest.skip(f"needs the real data in {SHARED} (not part of the repository)")
    return SHARED
