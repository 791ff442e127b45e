"""An exported generator as an MLflow model: browsable, registrable, loadable with ``mlflow.pyfunc``.

A run's ``model/`` artifact is the method's export (a diffusers folder, a StyleGAN2 checkpoint,
an LFS-GAN export, ...), which loads back as a source model. ``write_mlmodel`` adds an ``MLmodel``
file beside the export's own files, a ``python_function`` flavour whose loader is this module and
whose data is the folder itself: the same bytes are both the tool's export and an MLflow model,
nothing is stored twice. So the run's model can be registered (``--register NAME`` on ``train``
and ``best``, MLflow's Model Registry) and named ``models:/NAME/VERSION`` wherever a model or a
source model is accepted; and ``mlflow.pyfunc.load_model(...).predict`` draws images through
``trainers.generate``, the code path of ``orchestrate sample``::

    model = mlflow.pyfunc.load_model("models:/sketch-ddpm/1")
    images = model.predict([0, 1, 2, 3], params={"seed": 0, "steps": 50})   # uint8 [4,H,W,3]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MLMODEL = "MLmodel"


def write_mlmodel(folder: str | Path) -> Path:
    """Make an export folder an MLflow model (an ``MLmodel`` file; the rest stays as it is).

    The file is a function of the export's bytes: its ``model_uuid`` is their digest and it has no
    ``utc_time_created`` (MLflow fills the load time in when it is missing), so a resumed run's
    export stays byte-identical to a straight run's, and exports stay content-addressed."""
    import hashlib

    import yaml
    from mlflow.models import Model
    from mlflow.pyfunc import add_to_model

    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MLMODEL):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    model = Model(model_uuid=h.hexdigest()[:32], signature=_signature())
    add_to_model(model, loader_module=__name__, data=".")
    spec = model.to_dict()
    spec.pop("utc_time_created", None)
    path = folder / MLMODEL
    path.write_text(yaml.safe_dump(spec, default_flow_style=False, sort_keys=True))
    return path


def _signature():
    """The inference parameters ``predict`` takes (MLflow drops params a model does not declare):
    ``seed`` and ``trainers.generate.SampleOptions``'s fields, unset (None) by default."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    from trainers.generate import SampleOptions

    kinds = {int: "long", float: "double", str: "string"}
    specs = [ParamSpec("seed", "long", 0)]
    for name, field in SampleOptions.model_fields.items():
        types = [t for t in getattr(field.annotation, "__args__", (field.annotation,)) if t is not type(None)]
        kind = kinds.get(types[0], "string")  # Literal["ddim", "ddpm"] is a string
        specs.append(ParamSpec(name, kind, None))
    return ModelSignature(inputs=None, outputs=None, params=ParamSchema(specs))


class GeneratorPyfunc:
    """What ``mlflow.pyfunc.load_model`` returns for an exported generator (via ``_load_pyfunc``)."""

    def __init__(self, path: str | Path):
        from trainers.generate import open_model

        self.model = open_model(path)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """Images of the given indices (a list, an array, or a DataFrame with an ``index``
        column) as uint8 [N,H,W,3]; ``params``: ``seed`` and any sampling option (``steps``,
        ``sampler``, ``eta``, ``guidance``, ``label``, ``truncation``, ``task``)."""
        from trainers.generate import SampleOptions

        params = {k: v for k, v in (params or {}).items() if v is not None}
        seed = int(params.pop("seed", 0))
        if hasattr(model_input, "columns"):
            indices = model_input["index"].tolist()
        else:
            indices = np.asarray(model_input).reshape(-1).tolist()
        images = self.model.generate([int(i) for i in indices], seed, SampleOptions(**params))
        return images.permute(0, 2, 3, 1).numpy()


def _load_pyfunc(data_path: str) -> GeneratorPyfunc:
    """The ``python_function`` flavour's loader (MLflow calls it with the model's data folder)."""
    return GeneratorPyfunc(data_path)


def register(tracking_uri: str, run_id: str, name: str) -> str:
    """Register run ``run_id``'s ``model/`` artifact as a new version of registered model
    ``name``; returns ``models:/NAME/VERSION``."""
    from orchestrator.records import tracking

    c = tracking.client(tracking_uri)
    run = c.get_run(run_id)
    try:
        c.get_registered_model(name)
    except Exception:  # not registered yet
        c.create_registered_model(name, description="few-shot adapted generators (orchestrate)")
    version = c.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run_id,
                                     tags={"orchestrate.method": run.data.tags.get(tracking.TAG_METHOD, ""),
                                           "orchestrate.task": run.data.tags.get(tracking.TAG_TASK, "")})
    return f"models:/{name}/{version.version}"
