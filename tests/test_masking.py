"""Each masking policy's counts on hand-computed tensors."""

import math
import re

import numpy as np
import pytest
import torch

from forgetless.core.masking import (
    above_tau, fraction_count, random_mask, stm_labels, tau_for_fraction, weights_for_policy,
)
from forgetless.core.tokenstats import score_statistics

# ppl of 10 response tokens, hand-picked: 1.1 1.2 1.5 2.0 2.4 | 2.6 3.0 5.0 20.0 1000.0
PPL = np.array([1.1, 1.2, 1.5, 2.0, 2.4, 2.6, 3.0, 5.0, 20.0, 1000.0])
NLL = np.log(PPL)
SHUFFLE = np.array([7, 0, 9, 3, 5, 1, 8, 2, 6, 4])  # a fixed permutation so position != rank


def masked(weights):
    return set(np.flatnonzero(weights == 0).tolist())


def test_threshold_masks_ppl_above_tau():
    w, info = weights_for_policy(NLL[SHUFFLE], "threshold", tau=2.5)
    # ppl 2.6, 3.0, 5.0, 20, 1000 sit at shuffled positions of ranks 5..9
    assert masked(w) == {i for i, r in enumerate(SHUFFLE) if r >= 5}
    assert info["tau"] == 2.5


def test_above_tau_is_one_predicate_for_floats_arrays_and_tensors():
    # ppl 2.5 is not above 2.5 (strict); NaN is never above; inf masks nothing.
    values = [math.log(2.0), math.log(2.5), math.log(3.0), math.nan]
    assert above_tau(np.array(values), 2.5).tolist() == [False, False, True, False]
    assert above_tau(torch.tensor(values, dtype=torch.float64), 2.5).tolist() == [False, False, True, False]
    assert above_tau(math.log(3.0), 2.5) is True and not above_tau(math.log(1e6), math.inf)


def test_score_statistics_per_example_fraction_at_a_given_tau():
    # Example A: ppl 1.1, 3.0 (one above 2.5, none above 5); example B: ppl 6.0 (above both).
    nlls = [np.log([1.0, 1.1, 3.0]), np.log([1.0, 6.0])]  # position 0 is never scored
    masks = [np.array([True, True, True]), np.array([True, True])]
    at_paper = score_statistics(nlls, masks)["per_example_fraction_above_2.5"]
    assert at_paper == pytest.approx({"mean": 0.75, "min": 0.5, "max": 1.0})
    at_five = score_statistics(nlls, masks, example_tau=5.0)["per_example_fraction_above_5"]
    assert at_five == pytest.approx({"mean": 0.5, "min": 0.0, "max": 1.0})


def test_threshold_is_strict_and_inf_masks_nothing():
    nll = np.log(np.array([2.5, 2.5000001, 1.0]))
    assert masked(weights_for_policy(nll, "threshold", tau=2.5)[0]) == {1}
    assert masked(weights_for_policy(NLL, "threshold", tau=math.inf)[0]) == set()


@pytest.mark.parametrize("tau", [0.0, -1.0, math.nan])
def test_bad_tau_is_refused(tau):
    with pytest.raises(ValueError, match="tau"):
        weights_for_policy(NLL, "threshold", tau=tau)


@pytest.mark.parametrize("q", [-0.1, 1.0, 1.5, math.nan])
def test_bad_fraction_is_refused(q):
    with pytest.raises(ValueError, match="fraction"):
        weights_for_policy(NLL, "fraction", fraction=q)


def test_fraction_masks_floor_q_n_highest():
    w, _ = weights_for_policy(NLL[SHUFFLE], "fraction", fraction=0.25)  # floor(2.5) = 2 tokens
    assert masked(w) == {i for i, r in enumerate(SHUFFLE) if r >= 8}
    assert fraction_count(10, 0.3) == 3 and fraction_count(10, 0.29) == 2 and fraction_count(7, 0.0) == 0


def test_fraction_per_example():
    # example A: ppl 1.1 1.2 1000 5 ; example B: 1.5 2 2.4 2.6 3 20  (q=0.5 -> 2 and 3 tokens)
    nll = np.log(np.array([1.1, 1.2, 1000, 5, 1.5, 2.0, 2.4, 2.6, 3.0, 20.0]))
    w, _ = weights_for_policy(nll, "fraction", fraction=0.5, sizes=[4, 6])
    assert masked(w) == {2, 3, 7, 8, 9}


def test_auto_tau_hits_the_fraction_without_exceeding_it():
    tau = tau_for_fraction(NLL, 0.3)  # 3 tokens: ppl 5, 20, 1000 -> tau is the 4th largest, 3.0
    assert tau == pytest.approx(3.0)
    w, info = weights_for_policy(NLL, "auto-tau", fraction=0.3)
    assert masked(w) == {7, 8, 9} and info["tau"] == pytest.approx(3.0)


def test_random_mask_matches_threshold_count_and_is_seeded():
    w_thr, _ = weights_for_policy(NLL, "threshold", tau=2.5)
    w1, _ = weights_for_policy(NLL, "random", tau=2.5, seed=1)
    w2, _ = weights_for_policy(NLL, "random", tau=2.5, seed=1)
    w3, _ = weights_for_policy(NLL, "random", tau=2.5, seed=2)
    assert (w1 == 0).sum() == (w_thr == 0).sum() == 5
    assert np.array_equal(w1, w2)
    assert not np.array_equal(w1, w3)


def test_random_mask_is_without_replacement_and_uniform():
    counts = np.zeros(10)
    for seed in range(2000):
        m = random_mask(10, 3, seed)
        assert m.sum() == 3
        counts += m
    assert np.allclose(counts / 2000, 0.3, atol=0.04)


def test_inverse_masks_the_lowest_ppl_same_count():
    w, _ = weights_for_policy(NLL[SHUFFLE], "inverse", tau=2.5)
    assert masked(w) == {i for i, r in enumerate(SHUFFLE) if r < 5}


def test_reference_diff_selects_by_difference():
    ref = NLL.copy()
    ref[[2, 6]] -= 3.0  # the reference finds tokens 2 and 6 much easier: largest nll - ref
    w, _ = weights_for_policy(NLL, "reference-diff", fraction=0.2, reference_nll=ref)
    assert masked(w) == {2, 6}
    w_low, _ = weights_for_policy(NLL, "reference-diff", fraction=0.2, reference_nll=ref, mask_highest=False)
    assert masked(w_low).isdisjoint({2, 6}) and len(masked(w_low)) == 2
    with pytest.raises(ValueError, match="reference"):
        weights_for_policy(NLL, "reference-diff", fraction=0.2, reference_nll=ref[:3])


# DPF on 6 tokens, by hand (perplexities; NLL = log ppl):
#   token            0     1     2     3     4     5
#   base ppl        1.5   3.0   2.0   1.2   6.0   2.4
#   tuned ppl       1.4   2.0   5.0   3.2   9.0   2.3
#   tuned - base   -0.1  -1.0   3.0   2.0   3.0  -0.1
# dpf (tuned - base > 2.5): {2, 4}. Token 3 is not masked although nll_tuned - nll_base =
# log(3.2 / 1.2) = 0.98 > log 2.5 = 0.92: the authors compare perplexities, not NLLs.
# stm (base > 2.5): {1, 4}; dpf+stm (base > 2.5 or tuned > base): {1, 4} | {2, 3, 4} = {1, 2, 3, 4}.
BASE6, TUNED6 = np.log([1.5, 3.0, 2.0, 1.2, 6.0, 2.4]), np.log([1.4, 2.0, 5.0, 3.2, 9.0, 2.3])


def test_dpf_masks_where_tuned_ppl_exceeds_base_by_more_than_tau():
    w, info = weights_for_policy(BASE6, "dpf", tau=2.5, reference_nll=TUNED6)
    assert masked(w) == {2, 4}
    assert info == {"policy": "dpf", "ppl_margin": 2.5}


def test_dpf_plus_stm_is_the_union_of_stm_and_any_ppl_increase():
    assert masked(weights_for_policy(BASE6, "threshold", tau=2.5)[0]) == {1, 4}
    w, info = weights_for_policy(BASE6, "dpf+stm", tau=2.5, reference_nll=TUNED6)
    assert masked(w) == {1, 2, 3, 4}
    assert info["tau"] == 2.5 and info["masked_by_dpf_only"] == 2  # tokens 2 and 3


def test_dpf_needs_the_tuned_scores_of_the_same_tokens():
    for policy in ("dpf", "dpf+stm"):
        with pytest.raises(ValueError, match=re.escape(f"{policy} needs reference scores")):
            weights_for_policy(BASE6, policy, reference_nll=None)
        with pytest.raises(ValueError, match="same tokens"):
            weights_for_policy(BASE6, policy, reference_nll=TUNED6[:5])


def test_inverse_ppl_weight_is_token_probability():
    w, _ = weights_for_policy(np.log(np.array([1.0, 2.0, 4.0])), "inverse-ppl")
    assert w.tolist() == pytest.approx([1.0, 0.5, 0.25])


def test_nan_scores_are_never_silently_used():
    with pytest.raises(ValueError, match="NaN"):
        weights_for_policy(np.array([0.1, np.nan]), "none")


def test_inf_score_is_masked_by_threshold():
    w, _ = weights_for_policy(np.array([0.1, np.inf]), "threshold", tau=2.5)
    assert masked(w) == {1}


def test_stm_labels_for_own_trainer():
    labels = torch.tensor([[-100, -100, 11, 12, 13, -100]])
    nll = torch.tensor([[math.nan, 0.1, 0.2, 2.0, 0.9, math.nan]])  # ppl e^2 = 7.4 > 2.5
    out = stm_labels(labels, nll, tau=2.5)
    assert out.tolist() == [[-100, -100, 11, -100, 13, -100]]
    with pytest.raises(ValueError, match="NaN"):
        stm_labels(torch.tensor([[5, 6]]), torch.tensor([[math.nan, 0.1]]))


def test_top_level_exports_for_own_training_loops():
    import forgetless
    from forgetless.core.masking import stm_labels
    from forgetless.train.loss import MaskedLossMixin

    assert forgetless.stm_labels is stm_labels and forgetless.MaskedLossMixin is MaskedLossMixin
    with pytest.raises(AttributeError):
        forgetless.not_a_name  # noqa: B018
