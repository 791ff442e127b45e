"""Exact resume through the one training loop, without Ray: a run interrupted after a checkpoint and
started again is bit-identical to an uninterrupted one (every report's losses, the exported
weights, the final metrics) for every method; checkpoints load on the CPU whatever wrote them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from orchestrator.data.artifacts import fetch, publish
from orchestrator.core.config import parse_overrides, resolve
from orchestrator.runs.inputs import make_job, prepare
from orchestrator.runtime.loop import run_loop
from orchestrator.runtime.session import StoreSession
from orchestrator.runs.sources import ResolvedSource
from tests.tiny import TINY_RUN, write_tiny_task

METHODS = ["ddpm_finetune", "ddpm_pa", "dual_output", "self_guided", "gan_finetune", "dcl", "lfs_gan"]


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny DDPM and a tiny StyleGAN2 source on disk, and a module-wide cache."""
    import os

    from trainers.diffusion.backbone import build_unet, default_scheduler, save_source
    from trainers.gan.pretrain import GANPretrain, GANPretrainConfig
    from trainers.gan.source import save_gan_source

    root = tmp_path_factory.mktemp("resume")
    saved = os.environ.get("ORCHESTRATE_CACHE")
    os.environ["ORCHESTRATE_CACHE"] = str(root / "cache")
    torch.manual_seed(0)
    save_source(build_unet("tiny", 16), default_scheduler(), root / "ddpm")
    g = GANPretrain(GANPretrainConfig(preset="tiny"), 16, "cpu")
    save_gan_source(root / "gan", g.g, g.g_ema, g.d)
    yield root
    if saved is None:
        os.environ.pop("ORCHESTRATE_CACHE", None)
    else:
        os.environ["ORCHESTRATE_CACHE"] = saved


def _job(root: Path, method: str, name: str):
    gan = method in ("gan_finetune", "dcl", "lfs_gan")
    overrides = parse_overrides([s for s in TINY_RUN if not s.startswith("sample_steps")])
    overrides.update({"task.source.model": str(root / ("gan" if gan else "ddpm")),
                      "task.source.family": "stylegan2" if gan else "ddpm",
                      "run.steps": 30, "run.report_every": 5, "run.checkpoint_every": 10})
    if method in ("ddpm_finetune", "ddpm_pa", "dual_output", "self_guided"):
        overrides["sample_steps"] = 3
    task = write_tiny_task(root)
    cfg = resolve(method, task, overrides=overrides)
    storage = str(root / "runs")
    src = root / ("gan" if gan else "ddpm")
    inputs = prepare(cfg, storage=storage, source=ResolvedSource(publish(src, storage), None, src))
    return make_job(cfg, inputs, name=name, storage=storage)


def _run(job, stop_after: int | None = None, recorder=None):
    def on_report(metrics):
        if stop_after is not None and metrics["step"] == stop_after:
            raise Interrupt

    session = StoreSession(job.storage, job.name, on_report=on_report)
    try:
        return run_loop(job, session, recorder), session
    except Interrupt:
        return None, session


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("method", METHODS)
def test_interrupted_and_resumed_run_is_bit_identical(sources, method):
    straight, s0 = _run(_job(sources, method, f"{method}-straight"))
    _, s1 = _run(_job(sources, method, f"{method}-resumed"), stop_after=15)  # checkpoint at 10
    assert [c.rsplit("_", 1)[-1] for c in s1.checkpoints()] == ["000010"]
    resumed, s2 = _run(_job(sources, method, f"{method}-resumed"))
    assert s2.reports[0]["step"] == 15  # continued after the checkpoint at 10, not from scratch
    before = {r["step"]: r for r in s0.reports}
    after = {r["step"]: r for r in s1.reports + s2.reports}
    assert sorted(before) == sorted(after)
    for step, r in before.items():
        assert r["loss"] == after[step]["loss"], (method, step)
    assert _digest(fetch(straight.export)) == _digest(fetch(resumed.export))
    assert straight.export == resumed.export  # the same content digest
    for key in ("fid_domain", "intra_dist_domain", "kid_domain"):
        assert straight.metrics[key] == resumed.metrics[key], key


def test_the_loop_records_each_step_once_through_its_recorder_across_a_resume(sources):
    """The recorder seam: the loop records into whatever recorder it is given (here in memory) and,
    resumed, skips what that recorder already holds, as it does with an MLflow run's tag."""
    from orchestrator.records.recorder import MemoryRecorder

    rec = MemoryRecorder()
    job = _job(sources, "ddpm_finetune", "recorded")
    _run(job, stop_after=15, recorder=rec)  # stops after the report at 15; the checkpoint is at 10
    assert rec.logged_through() == 15
    result, _ = _run(job, recorder=rec)  # resumes at 10: steps 11..15 run again, recorded once
    assert [s for s, _ in rec.history("loss")] == list(range(1, 31))
    assert rec.grid_steps == [0, 10, 20, 30] and "samples/final.png" in rec.grids
    assert rec.grids["samples/step_000030.png"].shape[1:] == (3, 16, 16)
    assert rec.tags["orchestrate.restored_from_step"] == "10"
    assert rec.params["world_size"] == "1" and int(rec.params["trainable_parameters"]) > 0
    assert rec.export == result.export.model_dump_json() and "model_index.json" in rec.model_files
    assert [s for s, _ in rec.history("fid_domain")][-1] == 30


def test_a_job_with_an_mlflow_run_refuses_to_run_without_its_recorder(sources):
    job = _job(sources, "ddpm_finetune", "unrecorded").model_copy(update={"run_id": "0123abcd"})
    with pytest.raises(ValueError, match="pass its recorder"):
        run_loop(job, StoreSession(job.storage, job.name))


def test_the_training_loop_never_imports_mlflow():
    import subprocess
    import sys

    code = "import sys, orchestrator.runtime.loop, orchestrator.records.recorder; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_checkpoints_load_on_the_cpu_and_rng_states_restore_with_their_own_apis(tmp_path):
    """A checkpoint written on one device restores on another: tensors are loaded with
    map_location='cpu' whatever the caller's device, and RNG states (which only CPU ByteTensors
    can set) go through torch's own setters."""
    from orchestrator.core.rng import capture, load_state, restore
    from trainers.diffusion.backbone import build_unet, default_scheduler
    from trainers.diffusion.ddpm_finetune import DDPMFinetune, DDPMFinetuneConfig
    from trainers.diffusion.backbone import DiffusionSource

    m = DDPMFinetune(DDPMFinetuneConfig(), DiffusionSource(build_unet("tiny", 16), default_scheduler(), "t"), "cpu")
    gen = torch.Generator().manual_seed(3)
    torch.save({"method": m.state_dict(), "rng": capture(m, gen)}, tmp_path / "state.pt")
    expected = torch.rand(3, generator=gen), torch.rand(3), torch.rand(3, generator=m.generator)
    state = load_state(tmp_path / "state.pt")
    assert all(t.device.type == "cpu" for t in state["method"]["unet"].values())
    m2 = DDPMFinetune(DDPMFinetuneConfig(), DiffusionSource(build_unet("tiny", 16), default_scheduler(), "t"), "cpu")
    m2.load_state_dict(state["method"])
    gen2 = torch.Generator()
    restore(state["rng"], m2, gen2)
    assert torch.equal(torch.rand(3, generator=gen2), expected[0])
    assert torch.equal(torch.rand(3), expected[1])
    assert torch.equal(torch.rand(3, generator=m2.generator), expected[2])


def _leaves(state):
    if isinstance(state, dict):
        for v in state.values():
            yield from _leaves(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _leaves(v)
    else:
        yield state


@pytest.mark.parametrize("method", METHODS)
def test_the_rng_state_is_kept_in_one_place(sources, method):
    """A method's ``state_dict`` holds no generator state: every RNG of a run is captured once, per
    process, by orchestrator/core/rng.py (the bit-identical resume above shows it is enough)."""
    from orchestrator.core.rng import capture
    from orchestrator.runtime.loop import build_method
    from trainers.common import generator_states

    m, _ = build_method(_job(sources, method, f"{method}-rng"), torch.device("cpu"), 0)
    gens = generator_states(m)
    assert gens, "the method draws from generators of its own"
    assert set(capture(m, torch.Generator())["method"]) == set(gens)
    in_state = [v for v in _leaves(m.state_dict()) if isinstance(v, torch.Tensor) and v.dtype == torch.uint8
                and any(v.shape == g.shape and torch.equal(v, g) for g in gens.values())]
    assert not in_state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: saves on CUDA, restores elsewhere")
@pytest.mark.parametrize("method", ["ddpm_finetune", "gan_finetune", "lfs_gan"])
def test_cuda_checkpoint_resumes(sources, method, tmp_path):
    from orchestrator.core.rng import capture, load_state, restore
    from orchestrator.runtime.loop import build_method

    job = _job(sources, method, f"{method}-cuda")
    m, _ = build_method(job, torch.device("cuda"), 0)
    gen = torch.Generator(device="cuda").manual_seed(1)
    torch.save({"method": m.state_dict(), "rng": capture(m, gen)}, tmp_path / "s.pt")
    weights = {name: {k: v.detach().cpu() for k, v in net.state_dict().items()} for name, net in m.networks().items()}
    next_batch = torch.rand(3, generator=gen, device="cuda").cpu()  # what the restored generator must draw
    state = load_state(tmp_path / "s.pt")
    for device in ("cuda", "cpu"):
        m2, _ = build_method(job, torch.device(device), 0)
        m2.load_state_dict(state["method"])
        gen2 = torch.Generator(device=device)
        restore(state["rng"], m2, gen2)
        assert m2.step == m.step
        for name, net in m2.networks().items():
            for k, v in net.state_dict().items():
                assert torch.equal(v.cpu(), weights[name][k]), f"{device}: {name}.{k} differs after the restore"
        if device == "cuda":  # a CUDA generator's stream continues where it was saved
            assert torch.equal(torch.rand(3, generator=gen2, device="cuda").cpu(), next_batch)


def test_checkpoint_missing_a_file_is_refused_by_name(sources):
    """A checkpoint without its RNG file (an older layout, or copied in part) stops the resume with
    an error naming the folder and the file, before anything is trained."""
    from orchestrator.runtime.loop import CheckpointError

    job = _job(sources, "ddpm_finetune", "ddpm_finetune-partial")
    _, s1 = _run(job, stop_after=15)  # checkpoint at 10
    (folder,) = [Path(job.storage) / job.name / c for c in s1.checkpoints()]
    (folder / "rng_rank0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no rng_rank0\.pt .*found: .*state\.pt") as info:
        _run(_job(sources, "ddpm_finetune", "ddpm_finetune-partial"))
    assert str(folder) in str(info.value)


def test_cli_reports_a_worker_error_as_itself():
    """Ray Train wraps a worker's exception in WorkerGroupError; the CLI reads the failed rank's own."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    from orchestrator.cli import root_cause
    from orchestrator.runtime.loop import CheckpointError

    inner = CheckpointError("checkpoint /x: no rng_rank0.pt")
    try:
        try:
            raise WorkerGroupError("rank 1: ...", {1: inner, 3: RuntimeError("later rank")})
        except WorkerGroupError as exc:
            raise RuntimeError("fit failed") from exc
    except RuntimeError as outer:
        assert root_cause(outer) is inner
