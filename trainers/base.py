"""The small surface every adaptation method exposes.

A method is plain PyTorch: the orchestrator builds it, feeds it batches, asks it for samples and
for its state, and does everything else (Ray, MLflow, storage, device performance) around it.

* ``train_step(batch)`` returns the step's loss terms as 0-dim **tensors** on the device; the
  training loop accumulates them there and reads them at reports, so a step never waits for the
  GPU (no host sync per step).
* Precision, fused optimisers, channels_last and compile come from the :class:`DevicePerf` the
  loop passes in (``self.perf``); a method marks its network forwards with
  ``with self.perf.autocast():`` and builds its optimisers with ``self.perf.adam(...)``.
* ``networks()`` names the modules the loop may put in channels_last or compile.
* ``sample_task(task_id, ...)`` samples a learned task of a lifelong stream; a method with one
  set of weights samples the same generator for every task.
* ``prepare(images, context)`` is called once (and again after a resume) with every training
  image before the first step, for methods that derive something from the whole set (pseudo-
  labels); a method with ``wants_index = True`` then gets ``train_step(batch, index=...)``, the
  indices of the batch's images in that set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from trainers.perf import DevicePerf


@dataclass
class PrepareContext:
    """What the loop offers ``prepare``: the project's domain encoder file (self-supervised, trained
    on the source domain) when the run has one, and a node-local cache folder."""

    domain_encoder: Path | None = None
    cache_dir: Path | None = None


class MethodConfig(BaseModel):
    """Hyper-parameters shared by every method; each method extends it with its own."""

    # allow_inf_nan=False: `--set lr=.inf` (YAML's infinity) passes `gt=0` and trains on NaNs; every
    # float setting of every method (they all extend this class) must be a finite number
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    lr: float = Field(1e-4, gt=0, description="learning rate")
    batch_size: int = Field(8, ge=1, description="images per optimisation step and worker")
    grad_clip: float | None = Field(1.0, description="max gradient norm; null disables clipping")
    hflip: bool = Field(True, description="random horizontal flips of the shots")

    @classmethod
    def search_space(cls) -> dict[str, Any]:
        """The method's default sweep space: setting key -> {uniform|loguniform|int|choice: ...}
        (see orchestrator/search/space.py for the format). Keys are this config's fields or run.KEY."""
        return {"lr": {"loguniform": [1e-5, 1e-3]}}


class AdaptationMethod(ABC):
    """Base class: ``build`` -> ``train_step`` ... -> ``sample`` / ``state_dict`` / ``export``."""

    key: ClassVar[str]
    family: ClassVar[str]  # "diffusion" or "gan"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # what run.precision "auto" means on CUDA for this method (fp32 elsewhere)
    cuda_precision: ClassVar[str] = "bf16"
    # True: train_step(batch, index=...) gets the indices of the batch's images (see prepare)
    wants_index: ClassVar[bool] = False
    # True: prepare() needs PrepareContext.domain_encoder (e.g. for pseudo-labels)
    uses_domain_encoder: ClassVar[bool] = False
    # run.steps when a run does not set it: the budget at which the method's defaults move the
    # samples to a new target (the truth check's target_rate; README "Every method's defaults")
    default_steps: ClassVar[int] = 300

    def __init__(self, config: MethodConfig, source: Any, device: torch.device, seed: int = 0,
                 perf: DevicePerf | None = None):
        self.config = config
        self.source = source
        self.device = torch.device(device)
        self.perf = perf if perf is not None else DevicePerf(self.device)
        if self.perf.device != self.device:
            raise ValueError(f"perf is for {self.perf.device}, the method for {self.device}")
        self.seed = seed
        self.step = 0
        #: how exports name the source they adapted (``adapted_from``): the loop sets the source's
        #: artifact name and digest, which mean the same bytes on every node; a node-local path
        #: (the default, for methods built by hand) names nothing another machine can find.
        self.source_label = str(getattr(source, "origin", source))

    @property
    @abstractmethod
    def resolution(self) -> int: ...

    @abstractmethod
    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step on ``batch`` (float in [-1, 1], [B,3,H,W], on ``self.device``);
        returns 0-dim tensors (``loss`` and its terms), not synced to the host."""

    @abstractmethod
    def sample(self, n: int, steps: int | None = None, seed: int = 0) -> torch.Tensor:
        """``n`` images as uint8 [n,3,H,W] on the CPU; ``steps`` = sampling steps where relevant."""

    def evaluation_extras(self, samples: torch.Tensor, n: int, steps: int | None, seed: int,
                          final: bool) -> dict[str, float]:
        """The method's own numbers of an evaluation whose ``samples`` came from
        ``sample(n, steps, seed)`` (``final``: the run's last one); none by default."""
        return {}

    def sample_task(self, task_id: int, n: int, steps: int | None = None, seed: int = 0) -> torch.Tensor:
        """``n`` images of a learned task of a lifelong stream. Methods with one set of weights
        for every task (the shared-weight baselines) sample their one generator."""
        return self.sample(n, steps=steps, seed=seed)

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume training exactly (weights, optimiser, EMA, step) except the
        random number generators: those the method keeps as ``torch.Generator`` attributes (noise,
        timesteps, latents), like the global RNGs, are saved and restored by the caller, once per
        process (``orchestrator/core/rng.py``), because in data-parallel runs each rank's differ
        while one rank saves the weights."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; tensors may arrive on the CPU whatever the method's device
        (the loop loads checkpoints on the CPU first)."""

    @abstractmethod
    def export(self, folder: str | Path) -> Path:
        """Write the adapted generator in a format that loads as a source model."""

    def prepare(self, images: torch.Tensor, context: PrepareContext) -> None:
        """Called with every training image (uint8 [N,3,H,W] on the device) before the first step
        and after a resume; default: nothing."""

    def networks(self) -> dict[str, torch.nn.Module]:
        """The modules that run forward passes in training (channels_last / compile targets)."""
        return {}

    def continue_from(self, folder: str | Path) -> None:
        """Lifelong streams: take over the state of earlier tasks from the previous task's export
        (``folder``). Methods that share one set of weights across tasks already start from that
        export as their source, so the default does nothing."""

    def parallelize(self, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Wrap the trained modules for data-parallel training (e.g. DDP); default: nothing."""

    def trainable_parameters(self) -> int:
        return 0
