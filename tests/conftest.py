"""Test setup: import the package from this checkout's src/ (also when another checkout is installed), keep torch to
a couple of threads so the suite behaves the same on a 2-core CI machine, and, where timm is installed but no working
torchvision is, import timm with the tests' torchvision stand-in in its place (tests/torchvision_standin.py; the
stand-in leaves sys.modules once timm has imported, and the package itself never sees it)."""
import importlib.util
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

if importlib.util.find_spec("timm") is not None:
    import torchvision_standin  # noqa: E402  (tests/ is on sys.path, as for helpers)

    torchvision_standin.timm_importable()


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
