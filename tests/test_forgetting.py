"""Forgetting and BWT formulas against a hand-computed matrix."""

import math

import numpy as np
import pytest

from orchestrator.metrics.forgetting import empty_matrix, summarize


def test_lower_is_better_metric_by_hand():
    # FID after learning task k (rows) on task j (columns); NaN: not learned yet
    R = np.array([[10.0, math.nan, math.nan],
                  [14.0, 20.0, math.nan],
                  [18.0, 25.0, 30.0]])
    s = summarize(R, "fid_domain")
    assert s["avg_final_fid_domain"] == pytest.approx((18 + 25 + 30) / 3)
    assert s["forgetting_fid_domain_task0"] == pytest.approx(18 - 10)  # best 10 (k=0), final 18
    assert s["forgetting_fid_domain_task1"] == pytest.approx(25 - 20)
    assert s["forgetting_fid_domain"] == pytest.approx((8 + 5) / 2)
    # BWT: final minus just-learned = (18-10 + 25-20)/2 = 6.5 worse -> -6.5
    assert s["bwt_fid_domain"] == pytest.approx(-6.5)


def test_higher_is_better_metric_by_hand():
    R = np.array([[0.5, math.nan], [0.3, 0.6]])
    s = summarize(R, "intra_dist_domain")
    assert s["forgetting_intra_dist_domain_task0"] == pytest.approx(0.2)
    assert s["bwt_intra_dist_domain"] == pytest.approx(-0.2)
    assert s["avg_final_intra_dist_domain"] == pytest.approx(0.45)


def test_no_forgetting_when_earlier_columns_are_constant():
    R = np.array([[7.0, math.nan, math.nan], [7.0, 9.0, math.nan], [7.0, 9.0, 8.0]])
    s = summarize(R, "fid_domain")
    assert s["forgetting_fid_domain"] == 0 and s["bwt_fid_domain"] == 0


def test_single_task_and_shape_errors():
    s = summarize(np.array([[3.0]]), "fid_domain")
    assert s["forgetting_fid_domain"] == 0 and s["bwt_fid_domain"] == 0
    with pytest.raises(ValueError, match="square"):
        summarize(np.zeros((2, 3)), "fid_domain")
    assert np.isnan(empty_matrix(2)).all()


def test_prefix_summary_is_the_summary_of_the_learned_tasks():
    from orchestrator.runs.lifelong import prefix_summary

    R = {"fid_domain": np.array([[10.0, math.nan, math.nan],
                                 [14.0, 20.0, math.nan],
                                 [18.0, 25.0, 30.0]])}
    first = prefix_summary(R, 0)  # one task learned: nothing to forget yet
    assert first == {"avg_final_fid_domain": 10.0, "forgetting_fid_domain": 0.0, "bwt_fid_domain": 0.0}
    assert prefix_summary(R, 1)["avg_final_fid_domain"] == pytest.approx(17.0)
    assert prefix_summary(R, 1)["forgetting_fid_domain"] == pytest.approx(4.0)
    whole = {k: v for k, v in summarize(R["fid_domain"], "fid_domain").items() if "_task" not in k}
    assert prefix_summary(R, 2) == whole
