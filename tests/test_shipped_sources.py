"""The models shipped in ``trainers/builtin/``: together within the 25 MB budget; each source is
what its recipe in ``tasks/sources/`` makes (the key in its ``recipe.json`` is the recipe's
pretraining key); each source's samples are its domain's (the shipped classifier of the six
synthetic domains calls at least 80% of them ``source``), and the built-in tasks adapt it."""

import json
from pathlib import Path

import pytest

from orchestrator.core.config import builtin_task, load_task
from orchestrator.runs.sources import RECIPE_FILE, pretrain_key
from trainers.builtin import HERE, SOURCES, builtin_classifier, builtin_source, sample_source

REPO = Path(__file__).resolve().parents[1]
BUDGET_BYTES = 25 * 2 ** 20
SHIPPED = [(family, res, name) for (family, res), name in sorted(SOURCES.items()) if (HERE / name).is_dir()]
NOT_YET = pytest.mark.skipif(not SHIPPED, reason="no source is shipped in trainers/builtin yet")
SAMPLES = 128


def test_shipped_models_fit_the_budget():
    total = sum(f.stat().st_size for f in HERE.rglob("*")
                if f.is_file() and f.suffix not in (".py", ".pyc"))
    assert total <= BUDGET_BYTES, f"trainers/builtin holds {total / 2 ** 20:.1f} MB"


@NOT_YET
@pytest.mark.parametrize("family,resolution,name", SHIPPED)
def test_shipped_source_is_what_its_recipe_makes(family, resolution, name):
    recipe_file = REPO / "tasks" / "sources" / f"{name}.yaml"
    recipe = json.loads((HERE / name / RECIPE_FILE).read_text())
    task = load_task(recipe_file, family=family)
    assert recipe["pretrain_key"] == pretrain_key(task), \
        f"{HERE / name} was not made by {recipe_file} as it reads today"
    assert (recipe["family"], recipe["resolution"]) == (family, resolution)
    # the built-in tasks of this family adapt the shipped source instead of pretraining one
    assert builtin_task("sketch", family).source.model == "builtin"
    assert builtin_source(family, resolution) == HERE / name


@NOT_YET
@pytest.mark.slow
@pytest.mark.parametrize("family,resolution,name", SHIPPED)
def test_shipped_source_samples_are_its_domain(family, resolution, name):
    from trainers.metrics.domain_classifier import DomainClassifier

    classifier = DomainClassifier.load(builtin_classifier(resolution))
    samples = sample_source(family, HERE / name, SAMPLES)
    assert samples.shape == (SAMPLES, 3, resolution, resolution)
    rate = classifier.rate(samples, "source")
    assert rate >= 0.8, f"the classifier calls {rate:.2f} of {name}'s samples 'source'"
