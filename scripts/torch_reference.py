"""The PyTorch reference for side-by-side timing: He et al.'s CIFAR ResNet (option A
shortcuts) and one training step as PyTorch users write it, in three forms.

    eager      float32, NCHW (PyTorch's default)
    amp_bf16   autocast to bfloat16, channels_last memory format
    compile    torch.compile of the eager float32 step's model

The step: forward in train mode, cross-entropy, backward, SGD (lr 0.1, momentum 0.9,
weight decay 1e-4; PyTorch's coupled form, which is also ours). Data: random float32
images (never zeros) already on the device; warm-up steps excluded; the median of
`repeats` timed windows. Used by scripts/bench_train.py; alone:

    python scripts/torch_reference.py --depth 20 --batch 128 --mode eager
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShortcutA(nn.Module):
    """Option A: subsample by the stride, zero-pad the new channels after the old ones
    (as this project's zoo does), or half before and half after ("both": the layout of
    akamaster/pytorch_resnet_cifar10, whose released weights ../shared/reference holds)."""

    def __init__(self, stride: int, extra: int, pad: str = "after"):
        super().__init__()
        self.stride = stride
        self.sides = (0, extra) if pad == "after" else (extra // 2, extra // 2)

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.sides)) if any(self.sides) else x


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, pad: str = "after"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = ShortcutA(stride, cout - cin, pad)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet-(6n+2), option A; module names as in akamaster's
    reproduction (conv1, bn1, layer1..3, linear), so its state_dicts load as they are."""

    def __init__(self, depth: int = 20, num_classes: int = 10, pad: str = "after"):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for stage, width in enumerate((16, 32, 64)):
            blocks = []
            for i in range(n):
                blocks.append(Block(cin, width, 2 if stage and i == 0 else 1, pad))
                cin = width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean((2, 3)))


def step_timer(depth: int, batch: int, mode: str, steps: int = 10, warmup: int = 3,
               threads: int | None = None):
    """`mode`'s step built and warmed up on the CPU (or CUDA when available): (info,
    window), where window() times `steps` steps and returns seconds per step."""
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = CifarResNet(depth).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if mode == "amp_bf16":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    run = torch.compile(model) if mode == "compile" else model
    model.train()

    def one():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "amp_bf16"):
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def window() -> float:
        t = time.perf_counter()
        for _ in range(steps):
            one()
        sync()
        return (time.perf_counter() - t) / steps

    for _ in range(warmup):
        one()
    sync()
    return {"mode": mode, "depth": depth, "batch": batch, "device": device,
            "torch": torch.__version__, "threads": torch.get_num_threads()}, window


def step_time(depth: int, batch: int, mode: str, steps: int = 10, repeats: int = 5,
              warmup: int = 3, threads: int | None = None) -> dict:
    """Median ms per training step of `mode` over `repeats` windows."""
    info, window = step_timer(depth, batch, mode, steps, warmup, threads)
    ms = 1000 * statistics.median(window() for _ in range(repeats))
    return {**info, "ms_per_step": ms, "img_per_s": batch / ms * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--mode", choices=["eager", "amp_bf16", "compile"], default="eager")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    print(json.dumps(step_time(a.depth, a.batch, a.mode, a.steps, a.repeats)))


if __name__ == "__main__":
    main()
