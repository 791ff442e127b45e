"""Drawing images from any model the project makes or loads: an adapted run's export, a source.

``open_model(path)`` reads a model folder or file and returns a :class:`Model` whose
``generate(indices, seed, options)`` draws the images of those indices. It is the one sampler
behind ``orchestrate sample`` and ``orchestrate evaluate`` (``orchestrator.runtime.sampling`` spreads it
over a cluster) and knows every kind of generator the methods export:

==================  ========================================================================
kind                what it is, and its options
==================  ========================================================================
``ddpm``            a diffusers UNet (a ``DDPMPipeline`` folder, a bare UNet folder or a ``.pt``
                    checkpoint): ``ddpm_finetune``, ``ddpm_pa``, pretrained sources.
                    ``sampler`` ``ddim`` (Song et al. 2021, eq. 12, η = ``eta``) or ``ddpm``
                    (ancestral, Ho et al. 2020 Alg. 2, on the respaced schedule); ``steps``.
``dual_output``     a 7-channel dual-output UNet (Benny & Wolf 2022): the mixed x̂0 drives
                    ``ddim`` or ``ddpm`` steps, as ``trainers.diffusion.dual_output``.
``self_guided``     a self-guided export (Hu et al. 2023): ``guidance`` w (default: the export's),
                    ``label`` (a pseudo-class; default: uniform over the target's classes).
``stylegan2``       a rosinality-format checkpoint (``g_ema``): ``truncation`` ψ.
``lfs_gan``         an LFS-GAN export: its frozen base and every learned task's LeFT modulators;
                    ``task`` (default: the task it was exported after), ``truncation``.
==================  ========================================================================

Reproducible per image: image ``i`` is made from its own random generator, seeded from
``(seed, i)`` alone (:func:`image_generator`), which draws every random number of that image
(the starting noise, each stochastic step's noise, its label, a GAN's z and noise maps). So the
images of an index do not depend on which other indices share its batch or on how many workers
share the job; only the batch *composition* may change float rounding, which is why callers fix
the blocks of indices that form a batch (``orchestrator.runtime.sampling``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from trainers.common import SourceModelError, to_uint8

Kind = Literal["ddpm", "dual_output", "self_guided", "stylegan2", "lfs_gan"]
DIFFUSION_KINDS = ("ddpm", "dual_output", "self_guided")
GAN_KINDS = ("stylegan2", "lfs_gan")


class SampleOptions(BaseModel):
    """How to draw images; a field that a model's kind does not use must stay unset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampler: Literal["ddim", "ddpm"] | None = Field(None, description="diffusion: ddim (default) or ddpm")
    steps: int | None = Field(None, ge=1, le=10000, description="diffusion sampling steps (default 50)")
    eta: float | None = Field(None, ge=0, le=1, description="ddim's η (default 0: deterministic)")
    guidance: float | None = Field(None, ge=0, le=100, allow_inf_nan=False,
                                   description="self_guided: guidance scale w (default: the export's)")
    label: int | None = Field(None, ge=0, description="self_guided: the pseudo-class of every image")
    truncation: float | None = Field(None, gt=0, le=1, description="StyleGAN2: truncation ψ (default 1)")
    task: int | None = Field(None, ge=0, description="lfs_gan: which learned task (default: the last)")


DEFAULT_STEPS = 50
# The truncation centre of a GAN: the mean w of this many z drawn from a fixed seed (rosinality's
# ``mean_latent(4096)``); fixed so that it depends on the model only, not on the job's seed.
TRUNCATION_LATENTS, TRUNCATION_SEED = 4096, 0x7A11


def image_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of image ``index`` of a job seeded ``seed``: a 64-bit seed hashed from
    both (numpy's SeedSequence), so neighbouring seeds and indices give unrelated streams."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _noise(gens: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """[len(gens), *shape] with row i drawn from ``gens[i]`` (CPU)."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in gens])


@dataclass
class Model:
    """A generator ready to draw images on ``device`` (see the module docstring)."""

    kind: Kind
    path: Path
    resolution: int
    device: torch.device
    net: Any
    scheduler: Any = None
    info: dict[str, Any] | None = None

    # -- options --------------------------------------------------------------------------
    def check(self, options: SampleOptions) -> SampleOptions:
        """``options`` with this kind's defaults filled in; ValueError for an option that this
        kind does not use (a typo'd workflow should not silently do something else)."""
        used = {"ddpm": {"sampler", "steps", "eta"}, "dual_output": {"sampler", "steps"},
                "self_guided": {"steps", "eta", "guidance", "label"}, "stylegan2": {"truncation"},
                "lfs_gan": {"truncation", "task"}}[self.kind]
        given = {k for k, v in options.model_dump().items() if v is not None}
        extra = sorted(given - used)
        if extra:
            raise ValueError(f"{self.path}: a {self.kind} model takes {', '.join(sorted(used))}, not "
                             f"{', '.join(extra)}")
        if options.eta not in (None, 0) and options.sampler == "ddpm":
            raise ValueError("eta is DDIM's; the ddpm sampler is ancestral (use sampler ddim with eta 1 instead)")
        fill: dict[str, Any] = {}
        if self.kind in DIFFUSION_KINDS:
            fill["steps"] = options.steps or DEFAULT_STEPS
            if self.kind != "self_guided":
                fill["sampler"] = options.sampler or "ddim"
            if self.kind != "dual_output":
                fill["eta"] = options.eta or 0.0
        if self.kind == "self_guided":
            info = self.info or {}
            fill["guidance"] = options.guidance if options.guidance is not None else float(info.get("w", 0.0))
            if options.label is not None and options.label >= self.net.num_classes:
                raise ValueError(f"label {options.label}: the model has {self.net.num_classes} classes "
                                 f"(0..{self.net.num_classes - 1})")
        if self.kind in GAN_KINDS:
            fill["truncation"] = options.truncation if options.truncation is not None else 1.0
        if self.kind == "lfs_gan":
            tasks = sorted(self.info["tasks"])
            task = options.task if options.task is not None else int(self.info["current_task"])
            if task not in tasks:
                raise ValueError(f"task {task}: this LFS-GAN export has learned tasks {tasks}")
            fill["task"] = task
        return options.model_copy(update=fill)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "resolution": self.resolution, **{k: v for k, v in (self.info or {}).items()
                                                                        if k in ("adapted_by", "current_task")}}

    # -- drawing --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, indices: Sequence[int], seed: int, options: SampleOptions) -> torch.Tensor:
        """uint8 [len(indices),3,H,W] on the CPU: image ``indices[k]`` from its own generator."""
        o = self.check(options)
        gens = [image_generator(seed, int(i)) for i in indices]
        if not gens:
            return torch.zeros(0, 3, self.resolution, self.resolution, dtype=torch.uint8)
        if self.kind in GAN_KINDS:
            return self._gan(gens, o)
        r = self.resolution
        if self.kind == "self_guided":
            labels = self._labels(gens, o)
        x = _noise(gens, (3, r, r)).to(self.device)
        if self.kind == "ddpm":
            out = self._ddpm(x, gens, o)
        elif self.kind == "dual_output":
            from trainers.diffusion.dual_output import dual_denoise

            extra = self.info.get("sampling", {})
            out = dual_denoise(self.net, self.scheduler, x, o.steps, lambda shape: _noise(gens, shape[1:]),
                               sampler=o.sampler, **extra)
        else:
            from trainers.diffusion.self_guided import guided_denoise

            out = guided_denoise(self.net, self.scheduler, x, labels, o.steps, o.guidance, eta=o.eta,
                                 generator=gens if o.eta > 0 else None)
        return out.cpu()

    def _ddpm(self, x: torch.Tensor, gens, o: SampleOptions) -> torch.Tensor:
        from diffusers import DDIMScheduler, DDPMScheduler

        if o.sampler == "ddim":
            sched = DDIMScheduler.from_config(self.scheduler.config)
            kwargs = {"eta": o.eta, "generator": gens if o.eta > 0 else None}
        else:
            sched = DDPMScheduler.from_config(self.scheduler.config)
            kwargs = {"generator": gens}
        sched.set_timesteps(o.steps, device=self.device)
        for t in sched.timesteps:
            eps = self.net(x, t).sample
            x = sched.step(eps.float(), t, x, **kwargs).prev_sample
        return to_uint8(x)

    def _labels(self, gens, o: SampleOptions) -> torch.Tensor:
        if o.label is not None:
            return torch.full((len(gens),), int(o.label), dtype=torch.long)
        lo, hi = self.info.get("label_range", (0, self.net.num_classes))
        return torch.cat([torch.randint(lo, hi, (1,), generator=g) for g in gens])

    def _gan(self, gens, o: SampleOptions) -> torch.Tensor:
        g = self.net if self.kind == "stylegan2" else self._task_generator(o.task)
        z = _noise(gens, (g.style_dim,)).to(self.device)
        noise = [torch.cat(maps) for maps in zip(*[g.random_noise(1, gen) for gen in gens])]
        center = None
        if o.truncation < 1:
            center = g.mean_latent(TRUNCATION_LATENTS, generator=torch.Generator().manual_seed(TRUNCATION_SEED))
        img = g([z], noise=noise, truncation=o.truncation, truncation_latent=center)[0]
        return to_uint8(img.float()).cpu()

    def _task_generator(self, task: int):
        cache = self.info.setdefault("_merged", {})
        if task not in cache:
            from trainers.nets.left import LeFTGenerator

            s = self.info["settings"]
            left = LeFTGenerator(self.net, s["rank"], s["use_relu"], s["additive"], "zeros")
            left.modulators.load_state_dict(self.info["tasks"][task])
            cache.clear()  # one merged generator at a time: a job samples one task
            cache[task] = left.merged_generator().eval()
        return cache[task]


def model_kind(path: str | Path) -> Kind:
    """What kind of generator a folder or file holds (SourceModelError when none)."""
    from trainers.gan.source import is_gan_source

    path = Path(path)
    if not path.exists():
        raise SourceModelError(f"{path}: no such model folder or file")
    if is_gan_source(path):
        return "lfs_gan" if path.is_dir() and (path / "left_modulators.pt").is_file() else "stylegan2"
    if path.is_dir():
        from trainers.diffusion.self_guided import is_self_guided_source

        if is_self_guided_source(path):
            return "self_guided"
        unet_config = path / "unet" / "config.json" if (path / "unet").is_dir() else path / "config.json"
        if unet_config.is_file():
            out_channels = json.loads(unet_config.read_text()).get("out_channels", 3)
            return "dual_output" if out_channels == 7 else "ddpm"
        raise SourceModelError(f"{path}: not a model folder (expected a diffusers DDPM folder, a UNet folder "
                               "with config.json, a StyleGAN2 checkpoint folder, or an adapted run's export)")
    if path.suffix in {".pt", ".pth", ".ckpt", ".safetensors"}:
        return "ddpm"
    raise SourceModelError(f"{path}: not a model file (expected a .pt UNet checkpoint or a StyleGAN2 checkpoint)")


def open_model(path: str | Path, device: torch.device | str = "cpu") -> Model:
    """Load the generator at ``path`` for drawing images (see the module docstring)."""
    path = Path(path)
    device = torch.device(device)
    kind = model_kind(path)
    if kind in GAN_KINDS:
        from trainers.gan.source import load_gan_source

        src = load_gan_source(path, device)
        info: dict[str, Any] = dict(src.extra or {})
        net = src.g_ema
        if kind == "lfs_gan":
            from trainers.gan.lfs_gan import read_lfs_modulators

            blob = read_lfs_modulators(path)
            info.update(settings=blob["settings"], tasks=blob["tasks"], current_task=int(blob["current_task"]))
            net = src.g  # the frozen base; each task's generator is merged from it
        return Model(kind, path, src.resolution, device, net.eval(), info=info)
    from trainers.diffusion.backbone import load_source

    src = load_source(str(path), device)
    info = {}
    index = path / "model_index.json"
    if index.is_file():
        info = {k: v for k, v in json.loads(index.read_text()).items() if not k.startswith("_")
                and k not in ("unet", "scheduler")}
    net: Any = src.unet.eval()
    if kind == "self_guided":
        from trainers.diffusion.self_guided import load_conditional_unet

        net, spec = load_conditional_unet(src.unet, path)
        net.eval()
        first = int(spec.get("source_classes", 0))
        info.update(w=spec.get("w", 0.0), num_classes=net.num_classes,
                    label_range=(first, net.num_classes) if first < net.num_classes else (0, net.num_classes))
    elif kind == "dual_output":
        info["sampling"] = _dual_sampling(info)
    return Model(kind, path, src.resolution, device, net, scheduler=src.scheduler, info=info)


def _dual_sampling(info: dict[str, Any]) -> dict[str, Any]:
    """The dual-output sampler settings an export was made with (``dual_sampling`` in its
    ``model_index.json``, written by ``DualOutput.export``); the method's defaults when absent."""
    from trainers.diffusion.dual_output import DualOutputConfig

    if info.get("dual_sampling"):
        return dict(info["dual_sampling"])
    c = DualOutputConfig()
    return {"timestep_spacing": c.timestep_spacing, "clip": c.clip_mixed,
            "ddim_eps_from_clipped": c.ddim_eps_from_clipped, "ddpm_variance": c.ddpm_variance}


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` torch threads (None: as it is), restoring the previous count."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)
