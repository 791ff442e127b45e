"""``orchestrate train``: one adaptation run of a method on a task."""

from __future__ import annotations

from orchestrator import tracking
from orchestrator.config import ResolvedConfig
from orchestrator.launch import LaunchResult, run_job
from orchestrator.sources import source_for
from orchestrator.storage import data_cache_dir


def adaptation_job(config: ResolvedConfig, source: str) -> dict:
    """The plain-dict job a Ray Train worker runs (picklable, no pydantic objects)."""
    t = config.task.target
    return {
        "kind": "adapt", "method": config.method, "source": source, "resolution": config.task.resolution,
        "method_config": config.method_config, "run": config.run.model_dump(),
        "data": {"uri": t.data, "count": t.shots, "seed": t.seed, "image_column": t.image_column,
                 "storage_options": t.storage_options},
        "cache_dir": str(data_cache_dir()),
    }


def check_data(config: ResolvedConfig) -> None:
    """Load (and cache) the shots in the driver, so that bad data fails before Ray starts workers."""
    from trainers.data import load_images

    t = config.task.target
    load_images(t.data, config.task.resolution, count=t.shots, seed=t.seed, image_column=t.image_column,
                cache_dir=data_cache_dir(), storage_options=t.storage_options)


def train(config: ResolvedConfig, *, name: str | None = None, tracking_uri: str | None = None,
          storage: str | None = None, restart: bool = False) -> LaunchResult:
    check_data(config)
    source = source_for(config.task, tracking_uri=tracking_uri, storage=storage)
    name = name or config.default_name()
    return run_job(
        adaptation_job(config, source), name=name, experiment=config.method, tracking_uri=tracking_uri,
        storage=storage, params=config.flat_params(), config_yaml=config.to_yaml(), restart=restart,
        tags={tracking.TAG_KIND: "train", tracking.TAG_TASK: config.task.name,
              tracking.TAG_METHOD: config.method, "orchestrate.source": source},
    )
