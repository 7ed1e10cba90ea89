"""The statistics behind the verdicts, each on arrays small enough to do by hand."""

import math

import numpy as np
import pytest

from forgetless.core.bootstrap import (draw_resample, holm, holm_levels, p_tost, p_two_sided, percentile_interval,
                                       replicate_means)
from forgetless.core.hull import retention_at_gain, upper_hull, value_on_hull


def test_percentile_interval_by_hand():
    # 5 sorted replicates 0..4; level 0.5 -> quantiles 0.25, 0.75 at positions 0.25*4 = 1 and 3 -> values 1, 3
    assert percentile_interval([4.0, 0.0, 2.0, 1.0, 3.0], 0.5) == (1.0, 3.0)
    # level 0.8 -> quantiles 0.1, 0.9 at positions 0.4 and 3.6 -> 0 + 0.4*1 = 0.4, 3 + 0.6*1 = 3.6
    assert percentile_interval([0.0, 1.0, 2.0, 3.0, 4.0], 0.8) == pytest.approx((0.4, 3.6))
    # a NaN replicate (a curve missing g*) sits below everything for the low bound, above for the high one:
    # low sorted [-inf, 0, 1, 2, 3]: position 1 -> 0; high sorted [0, 1, 2, 3, +inf]: position 3 -> 3
    assert percentile_interval([0.0, 1.0, 2.0, 3.0, math.nan], 0.5) == (0.0, 3.0)
    lo, hi = percentile_interval([0.0, math.nan, math.nan, math.nan, 1.0], 0.5)
    assert lo == -math.inf and hi == math.inf


def test_p_values_by_hand():
    # 1 of 4 at or below 0, 3 of 4 at or above 0 -> p = 2 * min(1/4, 3/4) = 0.5
    assert p_two_sided([-1.0, 1.0, 2.0, 3.0]) == 0.5
    assert p_two_sided([1.0, 2.0, 3.0, 4.0]) == 0.0
    assert p_two_sided([0.0, 0.0]) == 1.0             # identical models: every replicate is 0
    assert p_two_sided([1.0, 2.0, 3.0, math.nan]) == 0.5  # the missing replicate is on both sides: 2 * 1/4
    # TOST at m = 0.25: shares at or below -0.25 = 1/4, at or above +0.25 = 0/4 -> max = 0.25
    assert p_tost([-0.3, 0.0, 0.1, 0.2], 0.25) == 0.25
    assert p_tost([0.0, 0.0, 0.0], 0.1) == 0.0
    assert p_tost([0.0, math.nan], 0.1) == 0.5


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]
    assert holm([0.5, 0.6]) == [1.0, 1.0]              # 2 * 0.5 = 1, 0.6 capped by the running max at 1
    one = holm([0.02, math.nan])                       # NaN is no test: k = 1
    assert one[0] == 0.02 and math.isnan(one[1])
    # levels: ranks 0, 2, 1 of 3 -> 1 - 0.05/3, 1 - 0.05/1, 1 - 0.05/2
    assert holm_levels([0.01, 0.04, 0.03], 0.05) == pytest.approx([1 - 0.05 / 3, 0.95, 0.975])


def test_replicate_means_and_paired_difference_by_hand():
    # 2 draws x 3 items of differences, 3 replicates given as counts
    diff = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    draws = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    items = np.array([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    # b0: draw 0 twice, every item once: 2 * (1 + 0 + 1) / 6 = 2/3
    # b1: both draws, item 0 three times: 3 * (1 + 0) / 6 = 1/2
    # b2: draw 1 twice, item 2 three times: 2 * 3 * 1 / 6 = 1
    assert replicate_means(diff, draws, items) == pytest.approx([2 / 3, 0.5, 1.0])


def test_resample_is_seeded_and_counts_sum_to_n():
    a = draw_resample(3, {"x": 5, "y": 2}, 50, seed=7)
    b = draw_resample(3, {"x": 5, "y": 2}, 50, seed=7)
    assert np.array_equal(a.draws, b.draws) and np.array_equal(a.items["x"], b.items["x"])
    assert (a.draws.sum(1) == 3).all() and (a.items["x"].sum(1) == 5).all() and (a.items["y"].sum(1) == 2).all()
    one = draw_resample(1, {"x": 4}, 10, seed=0)
    assert (one.draws == 1).all()                       # one draw: nothing to resample on that axis


def test_upper_hull_by_hand():
    # (0.1, 0.5) is under the chord from (0, 1) to (0.2, 0.8) (0.9 there): dropped
    assert upper_hull([(0.0, 1.0), (0.1, 0.5), (0.2, 0.8)]) == [(0.0, 1.0), (0.2, 0.8)]
    # a point above the chord stays; order of input does not matter
    assert upper_hull([(0.2, 0.8), (0.0, 1.0), (0.1, 0.95)]) == [(0.0, 1.0), (0.1, 0.95), (0.2, 0.8)]
    # a point exactly on the chord (0.25, 0.75) is dropped: the hull is the same line without it
    assert upper_hull([(0.0, 1.0), (0.25, 0.75), (0.5, 0.5)]) == [(0.0, 1.0), (0.5, 0.5)]
    # ties in gain: the higher retention is kept, whatever the order
    assert upper_hull([(0.1, 0.4), (0.0, 1.0), (0.1, 0.7)]) == [(0.0, 1.0), (0.1, 0.7)]
    assert upper_hull([(0.0, 1.0), (math.nan, 2.0)]) == [(0.0, 1.0)]


def test_value_on_hull_at_g_star_by_hand():
    hull = [(0.0, 1.0), (0.1, 0.95), (0.3, 0.55)]
    assert value_on_hull(hull, 0.05) == pytest.approx(0.975)   # halfway from 1.0 to 0.95
    assert value_on_hull(hull, 0.2) == pytest.approx(0.75)     # halfway from 0.95 to 0.55
    assert value_on_hull(hull, 0.3) == pytest.approx(0.55)     # the end point is reached
    assert value_on_hull(hull, 0.31) is None and value_on_hull(hull, -0.01) is None
    # the sorted-by-gain polyline would have read 0.5 at gain 0.1 here; the hull reads the chord: 1 - 0.2 = 0.8
    assert retention_at_gain([(0.0, 1.0), (0.1, 0.5), (0.2, 0.6)], 0.1) == pytest.approx(0.8)
    assert math.isnan(retention_at_gain([(0.0, 1.0), (0.05, 0.9)], 0.1))
