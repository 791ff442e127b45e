"""The small surface every adaptation method exposes (DESIGN.md, "Layers").

A method is plain PyTorch: the orchestrator builds it, feeds it batches, asks it for samples and
for its state, and does everything else (Ray, MLflow, storage) around it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field


class MethodConfig(BaseModel):
    """Hyper-parameters shared by every method; each method extends it with its own."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lr: float = Field(1e-4, gt=0, description="learning rate")
    batch_size: int = Field(8, ge=1, description="images per optimisation step and worker")
    grad_clip: float | None = Field(1.0, description="max gradient norm; null disables clipping")
    hflip: bool = Field(True, description="random horizontal flips of the shots")

    @classmethod
    def search_space(cls) -> dict[str, Any]:
        """The method's default sweep space: setting key -> {uniform|loguniform|int|choice: ...}
        (see orchestrator/space.py for the format). Keys are this config's fields or run.KEY."""
        return {"lr": {"loguniform": [1e-5, 1e-3]}}


class AdaptationMethod(ABC):
    """Base class: ``build`` -> ``train_step`` ... -> ``sample`` / ``state_dict`` / ``export``."""

    key: ClassVar[str]
    family: ClassVar[str]  # "diffusion" or "gan"
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig, source: Any, device: torch.device, seed: int = 0):
        self.config = config
        self.source = source
        self.device = torch.device(device)
        self.seed = seed
        self.step = 0

    @property
    @abstractmethod
    def resolution(self) -> int: ...

    @abstractmethod
    def train_step(self, batch: torch.Tensor) -> dict[str, float]:
        """One optimisation step on ``batch`` (float in [-1, 1], [B,3,H,W], on ``self.device``)."""

    @abstractmethod
    def sample(self, n: int, steps: int | None = None, seed: int = 0) -> torch.Tensor:
        """``n`` images as uint8 [n,3,H,W] on the CPU; ``steps`` = sampling steps where relevant."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume training exactly (weights, optimiser, EMA, step, RNG)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def export(self, folder: str | Path) -> Path:
        """Write the adapted generator in a format that loads as a source model."""

    def continue_from(self, folder: str | Path) -> None:
        """Lifelong streams: take over the state of earlier tasks from the previous task's export
        (``folder``). Methods that share one set of weights across tasks already start from that
        export as their source, so the default does nothing."""

    def parallelize(self, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Wrap the trained modules for data-parallel training (e.g. DDP); default: nothing."""

    def trainable_parameters(self) -> int:
        return 0
