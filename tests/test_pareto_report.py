"""The Pareto benchmark's reading of two sweeps (``benchmarks.pareto``): matched-quality levels,
the verdict, and the anchors' caveat, on hand-made trials whose answer is known."""

import pytest

from benchmarks import pareto


def trial(tid: str, fid: float, div: float, status: str = "FINISHED") -> dict:
    return {"trial_id": tid, "status": status, "fid_domain": fid, "intra_dist_domain": div, "config": {}}


def pair(a: list[dict], b: list[dict], anchors: dict | None = None) -> dict:
    data = {"methods": {"plain": {"trials": a, "front": []}, "clever": {"trials": b, "front": []}},
            "settings": {"trials": len(a), "steps": 10, "samples": 8, "task": None, "domain": "sketch"},
            "meta": {"seconds": 60, "cpus": 2, "torch": "x", "date": "d", "load_after": 0.0}}
    if anchors is not None:
        data["anchors"] = anchors
    return data


def test_the_method_with_more_diversity_at_every_matched_level_wins():
    plain = [trial("p1", 0.10, 0.02), trial("p2", 0.20, 0.04), trial("p3", 0.30, 0.06)]
    clever = [trial("c1", 0.10, 0.05), trial("c2", 0.20, 0.08), trial("c3", 0.30, 0.09),
              trial("c4", 0.05, 0.30, status="ERROR")]  # a failed trial counts for nothing
    data = pair(plain, clever)
    levels = pareto.matched_levels(data)
    assert levels[0] == pytest.approx(0.10)  # the best FID both methods reach with finished trials
    text, rows = pareto.verdict(data, levels)
    assert text.startswith("**clever**") and f"{len(levels)} of {len(levels)}" in text
    assert all(r["clever"]["trial_id"] != "c4" for r in rows)


def test_differences_within_five_percent_are_no_difference():
    data = pair([trial("p1", 0.1, 0.100), trial("p2", 0.2, 0.100)], [trial("c1", 0.1, 0.103), trial("c2", 0.2, 0.103)])
    text, _ = pareto.verdict(data, pareto.matched_levels(data))
    assert "no clear difference" in text


def test_no_common_quality_level_gives_no_verdict():
    data = pair([trial("p1", 0.1, 0.1)], [trial("c1", 0.5, 0.1, status="ERROR")])
    assert pareto.matched_levels(data) == []
    assert "no comparison" in pareto.verdict(data, [])[0]


def test_diversity_above_the_real_targets_is_called_leftover_source_content():
    real = {"fid_domain": 0.01, "intra_dist_domain": 0.04}
    data = pair([trial("p1", 0.2, 0.10), trial("p2", 0.3, 0.12)], [trial("c1", 0.2, 0.02), trial("c2", 0.3, 0.03)],
                anchors={"source (before adaptation)": {"fid_domain": 0.7, "intra_dist_domain": 0.25},
                         "real target images (another draw)": real})
    _, rows = pareto.verdict(data, pareto.matched_levels(data))
    caveat = pareto.above_target(data, rows)
    assert "source content not yet adapted away" in caveat and "20×" in caveat
    assert "less diverse than the target itself: clever c1" in caveat
    report = pareto.report(data, "diffusion")
    assert "real target images (another draw) | 0.01 | 0.04" in report and caveat in report
    below = pair([trial("p1", 0.2, 0.01)], [trial("c1", 0.2, 0.02)], {"real x": real})
    _, rows = pareto.verdict(below, pareto.matched_levels(below))
    assert rows and pareto.above_target(below, rows) == ""  # nothing above the target's diversity: no caveat
