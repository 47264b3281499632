"""Test setup: import the package from this checkout's src/ (also when another checkout is installed), and keep
torch to a couple of threads so the suite behaves the same on a 2-core CI machine."""
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def tmp_run_dir(tmp_path):
    return tmp_path / "runs"


@pytest.fixture
def without_onednn():
    """torch's native CPU convolutions instead of oneDNN's, which corrupt the heap on some machines (AMD EPYC, torch
    2.13.0+cpu) for the width-4 ResNets some tests train, aborting the process."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled
