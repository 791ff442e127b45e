"""Device performance, decided in one place for every method (the split Lightning makes between
research code and the trainer): precision, fused optimisers, channels_last, TF32, compile.

The run's settings (``run.precision``, ``run.channels_last``, ``run.compile``, ``run.tf32``) make
one :class:`DevicePerf`; the training loop hands it to the method it builds and applies the
module-level parts (channels_last, compile) to the method's ``networks()``. A method only says
*where* its network forwards run under reduced precision (``with self.perf.autocast():``) and
which sections must stay in fp32 (R1's double backward, the losses); it never chooses a dtype.

Precision: ``auto`` is bf16 autocast on CUDA and fp32 elsewhere; ``bf16`` asks for it on any
device; ``fp32`` never autocasts. fp16 is not offered: it would need a GradScaler around every
optimiser step of every method, and bf16 has fp32's range on every GPU this tool targets.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


@dataclass
class DevicePerf:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: Precision = "auto"
    channels_last: bool = False
    compile: bool = False
    tf32: bool = True

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision {self.precision!r}: expected auto, fp32 or bf16 "
                             "(fp16 is not offered; bf16 needs no loss scaling)")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32."""
        if self.precision == "bf16" or (self.precision == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Reduced precision for network forwards (a no-op in fp32)."""
        dtype = self.amp_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    @staticmethod
    def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
        """A section that must run in fp32 inside an autocast region (e.g. second-order gradients)."""
        return torch.autocast(torch.device(device).type, enabled=False)

    @property
    def fused(self) -> bool:
        """Fused optimiser kernels: one kernel per step for all parameters (CUDA only)."""
        return self.device.type == "cuda"

    def adam(self, params: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Adam:
        return torch.optim.Adam(params, fused=self.fused, **kwargs)

    def adamw(self, params: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, fused=self.fused, **kwargs)

    def apply_global(self) -> None:
        """Process-wide switches: TF32 matmuls and convolutions on Ampere+ GPUs."""
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
            torch.backends.cudnn.benchmark = True

    def prepare(self, modules: dict[str, torch.nn.Module]) -> None:
        """channels_last memory format and ``torch.compile`` on a method's networks, in place
        (``nn.Module.compile`` keeps the module object, so the method's references stay valid)."""
        for module in modules.values():
            if self.channels_last:
                module.to(memory_format=torch.channels_last)
            if self.compile:
                module.compile()

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
