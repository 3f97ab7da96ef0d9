import os

import pytest
import torch

# Triton's interpreter must be chosen before triton is imported; `make test` sets it too.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_tf32():
    """IEEE float32 convolutions for comparisons against float64 (restored afterwards)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def launched(monkeypatch):
    """Every ``Launch`` the launchers make (``kernels.launch.Launch.__call__``), in order."""
    from scd_triton.kernels.launch import Launch
    made, call = [], Launch.__call__
    monkeypatch.setattr(Launch, "__call__", lambda self, *a: made.append(self) or call(self, *a))
    return made
