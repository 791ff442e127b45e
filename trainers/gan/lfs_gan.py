"""``lfs_gan``: LFS-GAN — Seo, Kang, Park, "LFS-GAN: Lifelong Few-Shot Image Generation", ICCV 2023
(arXiv 2308.11917). Official code: KHU-AGI/LFS-GAN at commit 17c12f7 (2024-01-03): ``lifelong_model.py``,
``train.py``, ``evaluate_b_lpips.py``; read, not copied.

A lifelong stream of few-shot tasks (Sketches → Female → Sunglasses → Male → Babies, ten shots
each, in the paper) is learned by one **frozen** pretrained StyleGAN2 generator plus, per task, a
small rank-constrained LeFT modulator on every conv and linear weight of the generator
(``trainers.nets.left``: Ŵ = W ⊙ M + additive low-rank terms). Learning task k trains only task k's
modulators (and a discriminator), so the generator of every earlier task is untouched: forgetting
is zero by construction. On top of the adversarial loss of ``gan_finetune``, a cluster-wise
mode-seeking loss keeps the few-shot generator diverse:

* generate ``fake_multiplier``·B images (4B in the paper) for the B real shots of the batch, from
  fresh z (no style mixing, w = mapping(z) for every layer, random noise maps);
* without gradient, assign every fake to its nearest shot (LPIPS-VGG in the paper; pluggable
  here, see "distance" below) — the clusters;
* for every unordered pair (a, b) of fakes in the same cluster (a, b their **batch indices**):

      r_ab = L1(w_a, w_b)/L1(z_a, z_b) + (1/L) Σ_l L1(F^l_a, F^l_b)/L1(w_a, w_b) + L1(x_a, x_b)/L1(w_a, w_b)

  with L1 the mean absolute difference, F^l the output of StyledConv l (every synthesis layer);
* L_ms = 1/(mean_pairs r_ab + 1e-5), added to the generator loss with weight
  ``mode_seeking_weight`` (1 in the paper). Minimising it pushes the images (and the latent /
  feature paths to them) of samples that fall onto the same shot apart, i.e. against mode collapse
  onto a few shots.

Choices, and where we depart from the release (each noted):

* **Cluster members by batch index.** The release loops ``for pos2 in range(cluster_length)`` and
  compares ``w[pos2]``, ``feats[l][pos2]``, ``fake_img[pos2]`` — the first ``cluster_length``
  samples of the whole batch, not the cluster's members. We use the members' batch indices (the
  paper's intent). The release divides the pair sum by the number of clusters with ≥ 2
  members; we take the mean over pairs, as the paper states the loss. No pairs (every cluster of
  size one) → the term is 0 (the release would divide by zero). Denominators are clamped at 1e-12
  (never active for distinct random z) so that a degenerate pair cannot give inf/NaN.
* **Distance for the clusters** (``cluster_distance``): LPIPS weights are not available
  everywhere, so the default is ``"discriminator"``: an LPIPS-like distance on the current
  discriminator's feature maps (fromRGB and every ResBlock conv, i.e. every map before the
  minibatch-stddev layer, which would mix samples): channel-wise unit normalisation, squared
  difference summed over channels, averaged over pixels and layers (LPIPS with the
  discriminator as backbone and uniform layer weights). ``"pixel"`` is the Euclidean distance of
  the images; ``"lpips_vgg"`` / ``"lpips_alex"`` load LPIPS (``trainers.metrics.lpips``; a missing
  weight file is an error, never a silent substitute). ``set_cluster_distance(fn)`` plugs in any
  callable ``fn(a, b) -> [N]`` (with an optional ``.pairwise(a, b) -> [len(a), len(b)]``).
* **Discriminator per task**: fine-tuned per task as in the paper; each new task starts from the
  source's discriminator (the release trains every task in a separate run from the pretrained
  checkpoint) when ``reset_d_per_task`` (default). Not modulated (the release's D is plain).
* **No EMA** (the release samples the trained generator); ``ema_decay`` must stay 0.
* **Base generator** (``base_generator``): the source's ``g_ema`` by default — the generator one
  samples from; it stays frozen, so there is no EMA to make up for a raw ``g``. The release loads
  ``ckpt["g"]`` (inherited from CDC's script, where G is trained further); ``"g"`` reproduces it.
  An LFS-GAN export always supplies its frozen base as ``g`` (see ``export``) and is used as such.
* Adam lr 0.002, betas (0, 0.99), batch 4, rank 1, relu and additive terms on (the release's
  README command: ``--rank 1 --left_use_add --left_use_act``). The release also keeps CDC's
  anchor-region / patch-level discriminator loss (``Extra``, ``subspace_freq``) and path-length
  regularisation 2; neither is part of LFS-GAN as published, so neither is here by default
  (``path_regularize`` is available from ``gan_finetune``).
* The additive LeFT factors are trainable by default (``additive_init="lora"``): the release's
  all-zero init leaves them with zero gradient forever (see ``trainers.nets.left``).
* Rank r > 1 with the paper's constant init (``rank_init="constant"``, default) stays exactly
  symmetric in its r components, i.e. it is rank 1 with another scale; ``rank_init="perturbed"``
  gives a genuine rank-r modulator that is still exactly the identity at init (``trainers.nets.left``).

Task handling: ``config.task_id`` is the task being learned at build time. ``set_task(k)``
switches: the current modulators are stored (cloned) under their task id, task k's are loaded
(or a fresh identity modulator is made), the G optimiser restarts, and for a new task the
discriminator and its optimiser restart from the source's. ``sample_task(k, n, seed)`` samples with
any learned task's modulators; ``sample`` uses the current task's. ``state_dict`` holds the
modulators of every learned task plus the current optimisers, D and RNGs; ``export(folder)``
writes the frozen base (``g``), the current task's merged generator (``g_ema``, so the folder
loads as a source that samples like this task) and ``left_modulators.pt`` (every task);
``continue_from(folder)`` / ``load_lfs_modulators(folder)`` read them back.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator

from trainers.gan.gan_finetune import GANFinetune, GANFinetuneConfig, Latents, _adam
from trainers.gan.source import GANSource, save_gan_source
from trainers.nets.left import AdditiveInit, LeFTGenerator, RankInit
from trainers.perf import DevicePerf

MODULATORS_FILE = "left_modulators.pt"
MODULATORS_FORMAT = "lfs-gan-left-v1"
ClusterDistance = Literal["discriminator", "pixel", "lpips_vgg", "lpips_alex"]


class LFSGANConfig(GANFinetuneConfig):
    ema_decay: float = Field(0.0, ge=0, lt=1, description="must stay 0: LFS-GAN samples the trained modulators")
    rank: int = Field(1, ge=1, description="LeFT rank r")
    task_id: int = Field(0, ge=0, description="the task learned at build time (lifelong streams set it)")
    mode_seeking_weight: float = Field(1.0, ge=0, description="weight of the cluster-wise mode-seeking loss; 0 off")
    fake_multiplier: int = Field(4, ge=1, description="the mode-seeking loss uses fake_multiplier·B fakes")
    use_relu: bool = Field(True, description="ReLU inside the LeFT conv modulator (--left_use_act)")
    additive: bool = Field(True, description="additive low-rank LeFT terms (--left_use_add)")
    additive_init: AdditiveInit = Field("lora", description="lora: trainable additive terms; zeros: the release's")
    rank_init: RankInit = Field("constant", description="constant: the paper's (rank > 1 stays symmetric, i.e. "
                                "rank 1); perturbed: genuine rank r, still exactly the identity at init")
    cluster_distance: ClusterDistance = Field("discriminator", description="fake -> nearest shot distance")
    base_generator: Literal["g_ema", "g"] = Field("g_ema", description="which source generator is the frozen base")
    reset_d_per_task: bool = Field(True, description="every new task starts D from the source's discriminator")

    @model_validator(mode="after")
    def _no_ema(self) -> "LFSGANConfig":
        if self.ema_decay != 0 or self.ema_kimg is not None:
            raise ValueError("lfs_gan trains without EMA (as the official setup): ema_decay must be 0 and "
                             "ema_kimg null; each task's modulators are what is sampled")
        return self

    @classmethod
    def search_space(cls) -> dict[str, Any]:
        return {
            "lr": {"loguniform": [5e-4, 5e-3]},
            "rank": {"choice": [1, 2, 4]},
            "mode_seeking_weight": {"loguniform": [0.1, 10.0]},
        }


# -- the cluster-wise mode-seeking loss -------------------------------------------------------
def _pair_l1(x: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between x[ia[p]] and x[ib[p]] for every pair p -> [P]."""
    x = x.float()
    return (x[ia] - x[ib]).abs().flatten(1).mean(1)


def cluster_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch indices (a, b), a < b, of every pair of samples with the same cluster label."""
    same = labels[:, None] == labels[None, :]
    ia, ib = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
    return ia, ib


def cluster_mode_seeking_loss(z: torch.Tensor, w: torch.Tensor, features: list[torch.Tensor],
                              images: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LFS-GAN's cluster-wise mode-seeking loss (module docstring): over every pair (a, b) of
    samples with the same ``labels`` entry (indices into the batch),
    r = L1(w)/L1(z) + mean_l L1(F^l)/L1(w) + L1(x)/L1(w), and L = 1/(mean r + eps).
    Returns (loss, stats); with no pair the loss is a zero scalar (no gradient, no NaN). Finding
    the pairs (``nonzero``) waits for the device once per step: the pair count decides the shapes."""
    ia, ib = cluster_pairs(labels.to(z.device))
    counts = torch.bincount(labels.flatten().long())
    stats = {"ms_pairs": torch.tensor(float(ia.numel()), device=z.device),
             "ms_clusters": (counts >= 2).sum().float()}
    if ia.numel() == 0:
        return z.new_zeros((), dtype=torch.float32), stats
    tiny = 1e-12
    dz = _pair_l1(z, ia, ib).clamp_min(tiny)
    dw = _pair_l1(w, ia, ib).clamp_min(tiny)
    df = torch.stack([_pair_l1(f, ia, ib) for f in features]).mean(0)
    dx = _pair_l1(images, ia, ib)
    ratio = dw / dz + df / dw + dx / dw
    mean_ratio = ratio.mean()
    stats["ms_ratio"] = mean_ratio.detach()
    return 1.0 / (mean_ratio + eps), stats


# -- distances for the fake -> nearest-shot assignment ----------------------------------------
class DiscriminatorFeatureDistance:
    """LPIPS-like distance on a StyleGAN2 discriminator's per-sample feature maps (every map of
    ``Discriminator.forward(x, return_features=True)`` except the last, which follows the
    minibatch-stddev layer): per layer, unit-normalise along channels, squared difference summed
    over channels, mean over pixels; mean over layers."""

    name = "d_features"

    def __init__(self, features: Callable[[torch.Tensor], list[torch.Tensor]]):
        self.features = features

    @staticmethod
    def _unit(f: torch.Tensor) -> torch.Tensor:
        f = f.float()
        return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb = self.features(a), self.features(b)
        return torch.stack([(self._unit(x) - self._unit(y)).pow(2).sum(1).mean((1, 2))
                            for x, y in zip(fa, fb)]).mean(0)

    @torch.no_grad()
    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb = self.features(a), self.features(b)
        out = None
        for x, y in zip(fa, fb):
            x, y = self._unit(x), self._unit(y)
            hw = x.shape[-2] * x.shape[-1]
            xx = x.pow(2).sum((1, 2, 3)) / hw
            yy = y.pow(2).sum((1, 2, 3)) / hw
            d = xx[:, None] + yy[None, :] - 2 * torch.einsum("nchw,mchw->nm", x, y) / hw
            out = d if out is None else out + d
        return (out / len(fa)).clamp_min(0)


class PixelDistance:
    """Euclidean distance between the flattened images."""

    name = "pixel_l2"

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.flatten(1).float() - b.flatten(1).float()).norm(dim=1)

    @torch.no_grad()
    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cdist(a.flatten(1).float(), b.flatten(1).float())


@torch.no_grad()
def nearest_shot(fakes: torch.Tensor, shots: torch.Tensor, distance: Callable) -> torch.Tensor:
    """Index of the nearest shot for every fake under ``distance`` (pairwise if it has one)."""
    pairwise = getattr(distance, "pairwise", None)
    if callable(pairwise):
        dist = pairwise(fakes, shots)
    else:
        n, m = len(fakes), len(shots)
        dist = distance(fakes.repeat_interleave(m, 0), shots.repeat(n, 1, 1, 1)).reshape(n, m)
    return dist.float().argmin(1).to(fakes.device)


# -- saving and loading the per-task modulators ------------------------------------------------
def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def read_lfs_modulators(folder: str | os.PathLike) -> dict[str, Any]:
    """The whole ``left_modulators.pt`` record: format, settings, base fingerprint, current task,
    tasks {task_id: modulator state}."""
    path = Path(folder) / MODULATORS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {MODULATORS_FILE}: not an lfs_gan export")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != MODULATORS_FORMAT:
        raise ValueError(f"{path}: not an LFS-GAN modulator file (format {MODULATORS_FORMAT!r})")
    blob["tasks"] = {int(k): v for k, v in blob["tasks"].items()}
    return blob


def load_lfs_modulators(folder: str | os.PathLike) -> dict[int, dict[str, torch.Tensor]]:
    """{task_id: modulator state dict} of an ``lfs_gan`` export folder."""
    return read_lfs_modulators(folder)["tasks"]


class LFSGAN(GANFinetune):
    key = "lfs_gan"
    family = "gan"
    Config = LFSGANConfig

    def __init__(self, config: LFSGANConfig, source: GANSource, device: torch.device, seed: int = 0,
                 perf: DevicePerf | None = None):
        super().__init__(config, source, device, seed, perf)
        from_lfs_export = source.extra.get("adapted_by") == self.key
        if config.base_generator == "g_ema" and not from_lfs_export:
            base = source.g_ema
        else:
            base = self.g  # the source's g (an lfs_gan export stores its frozen base there)
        base = base.to(self.device).requires_grad_(False)
        self._task = int(config.task_id)
        self.g = LeFTGenerator(base, config.rank, config.use_relu, config.additive, config.additive_init,
                               config.rank_init, generator=self._init_generator(self._task))
        self.g_net = self.g
        # a second modulator set on the same base, for sampling other tasks (sample_task)
        # (its values are loaded from a task's state before every use)
        self._probe = LeFTGenerator(base, config.rank, config.use_relu, config.additive, "zeros")
        self._probe.requires_grad_(False)
        self.task_states: dict[int, dict[str, torch.Tensor]] = {}  # every learned task but the current
        self.g_optim = self._new_g_optim()
        self.d_source_state = _cpu_state(self.d.state_dict())
        self._distance: Callable | None = None
        self._lpips = None
        self._sample_net: torch.nn.Module | None = None
        self._ms_stats: dict[str, torch.Tensor] = {}
        self._fingerprint: str | None = None

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        c = self.config
        return {"rank": c.rank, "use_relu": c.use_relu, "additive": c.additive}

    def _init_generator(self, task_id: int) -> torch.Generator:
        """Seeded per (run seed, task): the random side of the additive factors of a new task."""
        return torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + task_id)

    def _new_g_optim(self) -> torch.optim.Adam:
        c = self.config
        return _adam(self.perf, self.g.modulators.parameters(), c.lr, c.g_reg_every, c.path_regularize > 0)

    def _new_d_optim(self) -> torch.optim.Adam:
        c = self.config
        return _adam(self.perf, self.d.parameters(), c.lr, c.d_reg_every, self.r1_gamma > 0)

    def trainable_parameters(self) -> int:
        """The current task's LeFT modulator parameters (what is stored per task)."""
        return self.g.modulator_count()

    def base_fingerprint(self) -> str:
        """sha256 of the frozen base generator's state (names, shapes, bytes)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in self.g.base.state_dict().items():
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # -- tasks -------------------------------------------------------------------------------
    @property
    def task_id(self) -> int:
        return self._task

    @property
    def learned_tasks(self) -> list[int]:
        return sorted({*self.task_states, self._task})

    def task_modulators(self, task_id: int | None = None) -> dict[str, torch.Tensor]:
        """A (cloned, CPU) state dict of a task's modulators; the current task's by default."""
        task_id = self._task if task_id is None else task_id
        if task_id == self._task:
            return _cpu_state(self.g.modulators.state_dict())
        if task_id not in self.task_states:
            raise KeyError(f"task {task_id} has not been learned; learned tasks: {self.learned_tasks}")
        return _cpu_state(self.task_states[task_id])

    def all_task_modulators(self) -> dict[int, dict[str, torch.Tensor]]:
        return {t: self.task_modulators(t) for t in self.learned_tasks}

    def set_task(self, task_id: int) -> None:
        """Switch the task being learned and sampled. The current modulators are stored under
        their id; ``task_id``'s are loaded if learned, else a fresh identity modulator is made
        (and, with ``reset_d_per_task``, D and its optimiser restart from the source's). The G
        optimiser always restarts. The step counter keeps counting."""
        task_id = int(task_id)
        if task_id < 0:
            raise ValueError(f"task ids are >= 0, got {task_id}")
        if task_id == self._task:
            return
        self.task_states[self._task] = _cpu_state(self.g.modulators.state_dict())
        new = task_id not in self.task_states
        if new:
            self.g.reset_modulators(self._init_generator(task_id))
        else:
            self.g.modulators.load_state_dict(self.task_states.pop(task_id))
        self._task = task_id
        self.g_optim = self._new_g_optim()
        if new and self.config.reset_d_per_task:
            self.d.load_state_dict(self.d_source_state)
            self.d_optim = self._new_d_optim()
            self.mean_path_length = torch.zeros((), device=self.device)

    def load_task_modulators(self, tasks: dict[int, dict[str, torch.Tensor]],
                             include_current: bool = False) -> list[int]:
        """Add learned tasks {task_id: modulator state}. The current task's entry is skipped (it
        keeps training from where it is) unless ``include_current``. Returns the ids loaded."""
        loaded = []
        for tid, state in sorted(tasks.items()):
            tid = int(tid)
            self._probe.modulators.load_state_dict(state)  # validates keys and shapes
            if tid == self._task:
                if not include_current:
                    continue
                self.g.modulators.load_state_dict(state)
            else:
                self.task_states[tid] = _cpu_state(state)
            loaded.append(tid)
        return loaded

    def continue_from(self, folder: str | Path) -> None:
        """Lifelong streams: take over every earlier task's modulators from the previous task's
        export. The base must be the same (checked by fingerprint) and so must the LeFT settings."""
        blob = read_lfs_modulators(folder)
        if blob["settings"] != self.settings:
            raise ValueError(f"{folder}: its modulators were made with {blob['settings']}, this run uses "
                             f"{self.settings}; LeFT settings must match across the tasks of a stream")
        if blob.get("base_fingerprint") not in (None, self.base_fingerprint()):
            raise ValueError(f"{folder}: its modulators belong to a different base generator than this "
                             "run's source; build the run from that export (its stylegan2.pt holds the base)")
        self.load_task_modulators(blob["tasks"])

    # -- the mode-seeking term ---------------------------------------------------------------
    def set_cluster_distance(self, fn: Callable | None) -> None:
        """Use ``fn(a, b) -> [N]`` (optionally with ``.pairwise``) to assign fakes to shots, e.g.
        a ``trainers.metrics.lpips.LPIPS``; None returns to ``config.cluster_distance``."""
        self._distance = fn

    def cluster_distance(self) -> Callable:
        if self._distance is not None:
            return self._distance
        kind = self.config.cluster_distance
        if kind == "discriminator":
            def features(x: torch.Tensor) -> list[torch.Tensor]:
                return self.discriminate(self.d, x, return_features=True)[1][:-1]
            return DiscriminatorFeatureDistance(features)
        if kind == "pixel":
            return PixelDistance()
        if self._lpips is None:
            from trainers.metrics.lpips import LPIPS

            self._lpips = LPIPS.from_pretrained(kind.split("_", 1)[1], device=self.device)
        return self._lpips

    def mode_seeking(self, real: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generate fake_multiplier·B images from fresh z (no mixing), cluster them by nearest shot
        in ``real``, and return the cluster-wise mode-seeking loss (unweighted) and its stats."""
        n = self.config.fake_multiplier * real.shape[0]
        z = torch.randn(n, self.style_dim, generator=self.generator, device=self.device)
        lat = Latents([z], None, self.g.random_noise(n, self.generator))
        # The unwrapped G: under DDP its modulators' gradients are still summed with the
        # adversarial ones before the (single) all-reduce hook of each parameter fires.
        fake, latent, feats = self.generate(self.g, lat, return_latents=True, return_features=True)
        w = latent[:, 0]  # one style for every layer: w = mapping(z)
        labels = nearest_shot(fake.detach(), real, self.cluster_distance())
        return cluster_mode_seeking_loss(z, w, feats, fake, labels)

    def g_losses(self, real: torch.Tensor, lat: Latents) -> dict[str, torch.Tensor]:
        terms = super().g_losses(real, lat)
        self._ms_stats = {}
        if self.config.mode_seeking_weight > 0:
            loss, self._ms_stats = self.mode_seeking(real)
            terms["g_ms"] = self.config.mode_seeking_weight * loss
        return terms

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().train_step(batch)
        out.update(self._ms_stats)
        return out

    # -- sampling ----------------------------------------------------------------------------
    @property
    def sampling_generator(self) -> torch.nn.Module:
        return self._sample_net if self._sample_net is not None else self.g

    @torch.no_grad()
    def sample_task(self, task_id: int, n: int, steps: int | None = None, seed: int = 0,
                    batch_size: int = 64) -> torch.Tensor:
        """``n`` uint8 images sampled with task ``task_id``'s modulators (same z/noise per seed
        as ``sample``)."""
        task_id = int(task_id)
        if task_id == self._task:
            return self.sample(n, steps, seed=seed, batch_size=batch_size)
        if task_id not in self.task_states:
            raise KeyError(f"task {task_id} has not been learned; learned tasks: {self.learned_tasks}")
        self._probe.modulators.load_state_dict(self.task_states[task_id])
        self._sample_net = self._probe
        try:
            return self.sample(n, steps, seed=seed, batch_size=batch_size)
        finally:
            self._sample_net = None

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "task_id": self._task,
            "settings": self.settings,
            "tasks": self.all_task_modulators(),
            "d": self.d.state_dict(),
            "g_optim": self.g_optim.state_dict(),
            "d_optim": self.d_optim.state_dict(),
            "mean_path_length": self.mean_path_length.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Exact resume: every task's modulators, the current task (the state's, whatever
        ``config.task_id`` says), optimisers, D, RNGs and step."""
        if state["settings"] != self.settings:
            raise ValueError(f"state made with LeFT settings {state['settings']}, this run uses {self.settings}")
        tasks = {int(k): v for k, v in state["tasks"].items()}
        self._task = int(state["task_id"])
        self.g.modulators.load_state_dict(tasks[self._task])
        self.task_states = {t: _cpu_state(s) for t, s in tasks.items() if t != self._task}
        self.g_optim = self._new_g_optim()
        self.g_optim.load_state_dict(state["g_optim"])
        self.d.load_state_dict(state["d"])
        self.d_optim.load_state_dict(state["d_optim"])
        self.step = int(state["step"])
        self.images_seen = int(state.get("images_seen", 0))
        self.mean_path_length = state["mean_path_length"].to(self.device)

    def export(self, folder: str | Path) -> Path:
        """``folder/stylegan2.pt`` (rosinality format): ``g`` = the frozen base, ``g_ema`` = the
        current task's merged generator (Ŵ baked in: the folder loads as a source that samples
        exactly like ``sample()``), ``d`` = the source's discriminator with ``reset_d_per_task``
        (what the next task starts from) else the adapted one; plus ``folder/left_modulators.pt``
        with every learned task's modulators."""
        folder = Path(folder)
        d = self.d
        if self.config.reset_d_per_task:
            d = copy.deepcopy(self.d).cpu()
            d.load_state_dict(self.d_source_state)
        save_gan_source(folder, self.g.base, self.g.merged_generator(), d,
                        extra={"adapted_by": self.key, "adapted_from": self.source_label,
                               "lfs_task_id": self._task})
        blob = {"format": MODULATORS_FORMAT, "settings": self.settings, "current_task": self._task,
                "base_fingerprint": self.base_fingerprint(), "tasks": self.all_task_modulators()}
        target = folder / MODULATORS_FILE
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        torch.save(blob, tmp)
        os.replace(tmp, target)
        return folder
