"""``orchestrate train``: one adaptation run of a method on a task."""

from __future__ import annotations

from orchestrator import tracking
from orchestrator.config import ResolvedConfig
from orchestrator.launch import LaunchResult, run_job
from orchestrator.sources import domain_encoder_for, source_for
from orchestrator.storage import data_cache_dir


def _data(spec, count: int | None, seed: int) -> dict:
    return {"uri": spec.data, "count": count, "seed": seed, "image_column": spec.image_column,
            "storage_options": spec.storage_options}


def adaptation_job(config: ResolvedConfig, source: str, domain_encoder: str | None = None) -> dict:
    """The plain-dict job a Ray Train worker runs (picklable, no pydantic objects)."""
    t, ref, run = config.task.target, config.task.reference, config.run
    return {
        "kind": "adapt", "method": config.method, "family": config.task.source.family, "source": source,
        "resolution": config.task.resolution,
        "method_config": config.method_config, "run": run.model_dump(),
        "data": _data(t, t.shots, t.seed),
        # the task's reference set; without one, metrics compare against the shots themselves
        "reference": _data(ref, ref.count, ref.seed) if ref is not None else None,
        "domain_encoder": domain_encoder,
        "cache_dir": str(data_cache_dir()),
    }


def check_inputs(config: ResolvedConfig) -> str | None:
    """In the driver, before Ray starts any worker: load (and cache) the shots and the reference
    set, check that the metric networks' weights exist, and train (once) the domain encoder.
    Returns the domain encoder's path when the run uses it."""
    from trainers.data import load_images
    from trainers.metrics import available_extractors

    t, ref, res = config.task.target, config.task.reference, config.task.resolution
    load_images(t.data, res, count=t.shots, seed=t.seed, image_column=t.image_column,
                cache_dir=data_cache_dir(), storage_options=t.storage_options)
    if ref is not None:
        load_images(ref.data, res, count=ref.count, seed=ref.seed, image_column=ref.image_column,
                    cache_dir=data_cache_dir(), storage_options=ref.storage_options)
    others = [m for m in config.run.metrics if m != "domain"]
    if others:
        available_extractors(others)  # raises MissingWeightsError naming the files
    return str(domain_encoder_for(config.task)) if "domain" in config.run.metrics else None


def train(config: ResolvedConfig, *, name: str | None = None, tracking_uri: str | None = None,
          storage: str | None = None, restart: bool = False) -> LaunchResult:
    encoder = check_inputs(config)
    source = source_for(config.task, tracking_uri=tracking_uri, storage=storage)
    name = name or config.default_name()
    return run_job(
        adaptation_job(config, source, encoder), name=name, experiment=config.method, tracking_uri=tracking_uri,
        storage=storage, params=config.flat_params(), config_yaml=config.to_yaml(), restart=restart,
        tags={tracking.TAG_KIND: "train", tracking.TAG_TASK: config.task.name,
              tracking.TAG_METHOD: config.method, "orchestrate.source": source},
    )
