"""A GPU or device the machine does not have is refused before training, naming the setting and the machine."""

from __future__ import annotations

import pytest
import torch

from speclora.devices import check_devices, machine_devices


@pytest.fixture
def two_gpus(monkeypatch):
    """torch as on a machine with two CUDA devices (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H200")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_machine_in_words(two_gpus):
    assert machine_devices() == "this machine has 2 CUDA devices: cuda:0 (NVIDIA H200), cuda:1 (NVIDIA H200)"


@pytest.mark.parametrize(("accelerator", "devices", "match"), [
    ("gpu", 1, "trainer.accelerator='gpu': this machine has no CUDA device .*it has: cpu; use --trainer.accelerator cpu"),
    ("cuda", "auto", "trainer.accelerator='cuda': this machine has no CUDA device"),
    ("auto", "cuda:0", "trainer.devices='cuda:0': no CUDA device 0; this machine has no CUDA device"),
    ("auto", [0], r"trainer.devices=\[0\]: no CUDA device 0; this machine has no CUDA device"),
    ("cpu", "cuda:0", "trainer.devices='cuda:0' names a CUDA device but trainer.accelerator='cpu'"),
])
def test_without_cuda(no_gpu, accelerator, devices, match):
    with pytest.raises(ValueError, match=match):
        check_devices(accelerator, devices)


@pytest.mark.parametrize(("accelerator", "devices", "match"), [
    ("gpu", "cuda:3", "trainer.devices='cuda:3': no CUDA device 3; this machine has 2 CUDA devices: cuda:0"),
    ("auto", [1, 2], r"trainer.devices=\[1, 2\]: no CUDA device 2; this machine has 2 CUDA devices"),
    ("gpu", "0,4", "trainer.devices='0,4': no CUDA device 4"),
    ("cuda", 3, "trainer.devices=3 asks for 3 CUDA devices; this machine has 2 CUDA devices"),
])
def test_a_device_the_machine_lacks(two_gpus, accelerator, devices, match):
    with pytest.raises(ValueError, match=match):
        check_devices(accelerator, devices)


def test_what_the_machine_has_passes_and_cuda_n_selects_that_device(two_gpus):
    assert check_devices("auto", "cuda:1") == ("cuda", [1])
    assert check_devices("gpu", [0, 1]) == ("gpu", [0, 1])
    assert check_devices("cuda", 2) == ("cuda", 2)
    assert check_devices("cpu", 4) == ("cpu", 4)  # CPU processes are not CUDA devices


def test_cpu_runs_pass_without_cuda(no_gpu):
    assert check_devices("auto", 1) == ("auto", 1)
    assert check_devices("cpu", "auto") == ("cpu", "auto")
    assert check_devices("auto", 2) == ("auto", 2)  # auto on a CPU machine: two processes
