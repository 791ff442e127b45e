"""orchestrator.records.mlflow_model: an export is also an MLflow pyfunc model whose ``predict`` is
``trainers.generate`` (the options reach it), and whose MLmodel is a function of the export."""

import shutil

import numpy as np
import pytest
import torch

from orchestrator.records.mlflow_model import MLMODEL, write_mlmodel
from tests.models import export_method
from trainers.generate import SampleOptions, open_model

OPTIONS = {"ddpm_finetune": {"steps": 3, "sampler": "ddpm"}, "ddpm_pa": {"steps": 2, "eta": 0.5},
           "dual_output": {"steps": 2}, "self_guided": {"steps": 2, "guidance": 2.0, "label": 1},
           "gan_finetune": {"truncation": 0.7}, "dcl": {}, "lfs_gan": {"task": 0}}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_pyfunc_predict_is_generate_with_every_option(tmp_path, method):
    import mlflow.pyfunc

    torch.set_num_threads(1)
    export = export_method(method, tmp_path / method)
    write_mlmodel(export)
    opts = OPTIONS[method]
    want = open_model(export).generate([0, 5], 1, SampleOptions(**opts)).permute(0, 2, 3, 1).numpy()
    model = mlflow.pyfunc.load_model(str(export))
    assert np.array_equal(model.predict([0, 5], params={"seed": 1, **opts}), want)
    if opts and method != "lfs_gan":  # (the tiny LFS-GAN export has one task: 0 is its default)
        # the options act: without them (MLflow would drop undeclared params) the images differ
        assert not np.array_equal(model.predict([0, 5], params={"seed": 1}), want)


def test_mlmodel_is_a_function_of_the_export(tmp_path):
    export = export_method("gan_finetune", tmp_path / "a" / "model")
    first = write_mlmodel(export).read_bytes()
    copy = tmp_path / "b" / "model"
    shutil.copytree(export, copy)
    (copy / MLMODEL).unlink()
    assert write_mlmodel(copy).read_bytes() == first  # no creation time, uuid = the files' digest
    other = export_method("gan_finetune", tmp_path / "c" / "model", seed=1)
    assert write_mlmodel(other).read_bytes() != first
