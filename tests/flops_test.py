"""MFU needs the chip's peak: every current TPU and GPU kind, by the ``device_kind`` string JAX reports."""

import types

import pytest

from trainer.models.flops import peak_flops


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None)])
def test_peak_of_each_device_kind(kind, peak):
    assert peak_flops(types.SimpleNamespace(device_kind=kind)) == peak
