"""The sweep report (orchestrator.search.report): importances find the parameter that decides the score,
only comparable (FINISHED) trials enter the study, and the page is self-contained."""

from __future__ import annotations

import json
import random

import pytest

from orchestrator.search.report import MIN_TRIALS, importances, study_of, write_report
from orchestrator.search.space import optuna_distributions

SPACE = {"lr": {"loguniform": [1e-5, 1e-2]}, "weight": {"uniform": [0.0, 8.0]}, "t_max": {"int": [200, 1000, 100]},
         "kl": {"choice": ["forward", "reverse"]}, "steps": 300}


def planted(n: int = 40, seed: int = 0) -> list[dict]:
    """Trials where ``weight`` alone decides ``fid`` (the rest adds 1% noise) and ``lr`` alone
    decides ``diversity``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cfg = {"lr": 10 ** rng.uniform(-5, -2), "weight": rng.uniform(0, 8), "t_max": rng.choice(range(200, 1001, 100)),
               "kl": rng.choice(["forward", "reverse"]), "steps": 300}
        fid = 10 * cfg["weight"] + 0.1 * rng.random()
        div = -abs(cfg["lr"] - 1e-3) * 1e3 + 0.01 * rng.random()
        out.append({"trial_id": f"t{i:02d}", "status": "FINISHED", "step": 300, "config": cfg, "fid": fid,
                    "diversity": div})
    return out


def test_the_space_becomes_optuna_distributions_without_its_constants():
    d = optuna_distributions(SPACE)
    assert set(d) == {"lr", "weight", "t_max", "kl"}
    assert d["lr"].log and d["t_max"].step == 100 and d["kl"].choices == ("forward", "reverse")


def test_importances_rank_the_planted_parameter_first_for_each_objective():
    study = study_of(planted(), SPACE, ["fid", "diversity"], ["min", "max"])
    imp = importances(study, ["fid", "diversity"])
    assert next(iter(imp["fid"])) == "weight" and imp["fid"]["weight"] > 0.8, imp["fid"]
    assert next(iter(imp["diversity"])) == "lr", imp["diversity"]
    assert sum(imp["fid"].values()) == pytest.approx(1.0)
    assert importances(study, ["fid", "diversity"]) == imp  # seeded: the same trials, the same numbers


def test_only_finished_trials_with_every_value_enter_the_study():
    trials = planted(6)
    trials[0]["status"] = "KILLED"  # stopped at a rung: its value is from an earlier step
    trials[1]["status"] = "FAILED"
    trials[2]["fid"] = None
    trials[3]["fid"] = float("nan")
    study = study_of(trials, SPACE, ["fid"], ["min"])
    assert [t.user_attrs["trial_id"] for t in study.trials] == ["t04", "t05"]
    assert importances(study, ["fid"]) == {}  # fewer than MIN_TRIALS: no numbers that mean nothing
    assert MIN_TRIALS == 3


def test_the_page_embeds_its_figures_and_ranks_the_front_first(tmp_path):
    trials = planted(12)
    trials[5]["status"] = "KILLED"
    grid = tmp_path / "g.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(grid)
    rep = write_report(trials, SPACE, ["fid", "diversity"], ["min", "max"], tmp_path / "out", title="Sweep s",
                       top_k=3, grids={t["trial_id"]: grid for t in trials})
    page = rep.page.read_text()
    assert rep.finished == 11 and len(rep.top) == 3
    assert "11 finished, 1 stopped early or killed, 0 failed" in page
    assert page.count("data:image/png;base64,") == len(rep.figures) + 3
    names = {p.name for p in rep.figures}
    assert {"history_fid.png", "importances_fid.png", "parallel_fid.png", "pareto_front.png"} <= names
    assert json.loads((tmp_path / "out" / "importances.json").read_text()) == rep.importances
    best_fid = min(t["fid"] for t in trials if t["status"] == "FINISHED")
    assert rep.top[0]["fid"] == best_fid  # on the front, and best on the first objective


def test_too_few_trials_say_so_on_the_page(tmp_path):
    rep = write_report(planted(2), SPACE, ["fid"], ["min"], tmp_path, title="Sweep tiny")
    assert rep.importances == {} and "importances need at least 3" in rep.page.read_text()
