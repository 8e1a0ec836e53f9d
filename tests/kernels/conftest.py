"""The fixture of the MoE kernel cases (kernel_cases.py): the device they run on."""

import pytest
import torch
from kernel_cases import DEVICE


@pytest.fixture
def dev(monkeypatch) -> torch.device:
    monkeypatch.delenv("MOEQUANT_KERNEL", raising=False)
    return DEVICE
