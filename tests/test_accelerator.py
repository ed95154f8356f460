"""The GPU path's CPU-side plumbing: the defaults per device, the autocast dtype and scaler, channels-last weights,
and the loader chosen for the device (no GPU needed: nothing here runs a CUDA kernel)."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.data import DataLoader, ThreadDataLoader

from pipeline.accelerator import amp_dtype, configure_amp, default_workers, to_channels_last, uses_scaler
from pipeline.config import load_config
from pipeline.data.sharding import slice_loader


def test_defaults_are_off_on_the_cpu_and_on_for_cuda():
    parser = load_config("mni", "ce", "unet")
    assert parser.get_parsed_content("device") == torch.device("cpu")  # the test machines have no GPU
    assert parser.get_parsed_content("amp") is False
    assert parser.get_parsed_content("channels_last") is False
    assert parser.get_parsed_content("num_workers") == 0
    assert parser.get_parsed_content("find_unused_parameters") is False
    parser["device"] = "$torch.device('cuda')"
    assert parser.get_parsed_content("amp") is True and parser.get_parsed_content("channels_last") is True
    assert parser.get_parsed_content("num_workers") == default_workers("cuda") >= 0
    assert load_config("mni", "ce", "unetpp").get_parsed_content("find_unused_parameters") is True


def test_amp_dtype_and_scaler():
    assert amp_dtype("cpu") == torch.float16  # never used on the CPU; float16 is the fallback
    assert uses_scaler(torch.float16) and not uses_scaler(torch.bfloat16)
    assert default_workers("cpu") == 0


class _Trainer(Engine):
    """A stand-in for MONAI's trainer: an optimizer and the scaler MONAI makes at each run."""

    def __init__(self) -> None:
        super().__init__(lambda engine, batch: None)
        self.optimizer, self.scaler, self.amp_kwargs = object(), "monai's scaler", {}


def test_bfloat16_autocast_drops_the_loss_scaler_and_float16_keeps_it():
    trainer, evaluator = _Trainer(), Engine(lambda engine, batch: None)
    configure_amp(torch.bfloat16, trainer, evaluator)
    assert trainer.amp_kwargs == {"dtype": torch.bfloat16} == evaluator.amp_kwargs
    trainer.run([0], max_epochs=1)
    assert isinstance(trainer.scaler, torch.amp.GradScaler) and not trainer.scaler.is_enabled()
    half = _Trainer()
    configure_amp(torch.float16, half)
    half.run([0], max_epochs=1)
    assert half.scaler == "monai's scaler" and half.amp_kwargs == {"dtype": torch.float16}


def test_channels_last_changes_the_layout_not_the_values():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4)).eval()
    x = torch.rand(2, 2, 8, 8)
    before = net(x)
    assert to_channels_last(net, False)[0].weight.is_contiguous()
    to_channels_last(net, True)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(net(x), before, atol=1e-6)


def test_loader_for_the_device():
    data = [{"x": torch.tensor(float(i))} for i in range(6)]
    cpu = slice_loader(data, 2, num_workers=0, seed=1)
    assert type(cpu) is DataLoader and not cpu.pin_memory
    gpu = slice_loader(data, 2, num_workers=2, seed=1, device="cuda")
    assert isinstance(gpu, ThreadDataLoader) and gpu.pin_memory and gpu.persistent_workers
    again = slice_loader(data, 2, num_workers=0, seed=1)
    assert [b["x"].tolist() for b in cpu] == [b["x"].tolist() for b in again]  # the seed fixes the order
