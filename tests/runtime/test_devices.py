"""The compute device of --device, and what a pass may plan for on it."""

import pytest
import torch

from moequant.errors import MoEQuantError
from moequant.runtime.devices import free_bytes, pinned, resolve_device


def test_resolve_device():
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("") == resolve_device("auto") == auto
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(MoEQuantError, match="unknown device 'gpu0'; use cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    with pytest.raises(MoEQuantError, match="device 'meta' is not supported"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without CUDA")
def test_cuda_without_cuda_is_refused_and_the_host_is_not_planned_here():
    with pytest.raises(MoEQuantError, match="--device cuda:1: no CUDA device is available here"):
        resolve_device("cuda:1")
    assert free_bytes(torch.device("cpu")) is None
    t = torch.ones(3)
    assert pinned(t) is t
