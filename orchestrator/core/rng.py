"""Checkpoint state that decides the next step besides the method's weights: every RNG.

One helper for every method, so that a resumed run is bit-identical to an uninterrupted one on
the CPU (and draws the same random numbers on a GPU):

* the global torch CPU RNG (``torch.get_rng_state``), every CUDA device's RNG
  (``torch.cuda.get_rng_state_all``), numpy's and Python's global RNGs;
* the loop's batch generator (which shots, which flips);
* every ``torch.Generator`` the method keeps as an attribute (noise, timesteps, latents:
  ``trainers.common.generator_states``), per rank — in data-parallel runs rank 0 saves the method's
  weights once, but each rank's own generators are saved and restored by that rank. This is the
  only place a run's RNG state is kept: the methods' ``state_dict`` holds none.

Checkpoints are always loaded on the CPU (``map_location="cpu"``) and the pieces then moved
where they belong: ``torch.set_rng_state`` and ``Generator.set_state`` accept only CPU
ByteTensors, also for CUDA generators, and a CUDA tensor would be rejected on resume.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers.common import generator_states, load_generator_states


def load_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, on the CPU whatever device wrote it."""
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture(method: Any, batch_generator: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "batch": batch_generator.get_state(),
        "method": generator_states(method),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.uint8)


def restore(state: dict[str, Any], method: Any, batch_generator: torch.Generator) -> None:
    torch.set_rng_state(_cpu_bytes(state["torch_cpu"]))
    if state.get("torch_cuda") is not None and torch.cuda.is_available():
        saved = [_cpu_bytes(s) for s in state["torch_cuda"]]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:  # another number of visible GPUs: restore the ones both have
            for i, s in enumerate(saved[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    batch_generator.set_state(_cpu_bytes(state["batch"]))
    load_generator_states(method, state.get("method", {}))
