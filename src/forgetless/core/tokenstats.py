"""Statistics of per-token scores: what fraction of response tokens each threshold would mask."""

from __future__ import annotations

import numpy as np

from forgetless.core.masking import PAPER_TAU, above_tau

# The paper's threshold sweep (perplexity units).
TAU_SWEEP = (1.5, 2.5, 10.0, 25.0, 100.0, 1000.0)


def scored_response_nll(nll: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
    """NLL of an example's scored response tokens (position 0 is never scored)."""
    mask = np.asarray(response_mask, dtype=bool).copy()
    mask[0] = False
    return np.asarray(nll, dtype=np.float64)[mask]


def score_statistics(nlls: list[np.ndarray], response_masks: list[np.ndarray], taus=TAU_SWEEP,
                     example_tau: float = PAPER_TAU) -> dict:
    """Response-token perplexity statistics over a data set.

    ``fraction_above[tau]`` is the share of response tokens with ppl > tau, which is exactly
    the masked fraction of the threshold policy at that tau; ``per_example_fraction_above_<τ>``
    spreads that share over examples at ``example_tau``.
    """
    per_example = [scored_response_nll(n, m) for n, m in zip(nlls, response_masks)]
    flat = np.concatenate(per_example)
    ppl = np.exp(flat)
    fraction_above = {str(t): float(np.mean(above_tau(flat, t))) for t in taus}
    example_fraction = np.array([np.mean(above_tau(e, example_tau)) for e in per_example])
    return {
        "response_tokens": int(flat.size),
        "mean_nll": float(np.mean(flat)),
        "corpus_ppl": float(np.exp(np.mean(flat))),
        "mean_token_ppl": float(np.mean(ppl)),
        "median_token_ppl": float(np.median(ppl)),
        "fraction_above": fraction_above,
        "spike_tokens": {f">{t:g}": int(np.sum(above_tau(flat, t))) for t in (10.0, 100.0, 1000.0)},
        "examples_with_spike_over_100": int(sum(bool(np.any(above_tau(e, 100.0))) for e in per_example)),
        f"per_example_fraction_above_{example_tau:g}": {
            "mean": float(example_fraction.mean()),
            "min": float(example_fraction.min()),
            "max": float(example_fraction.max()),
        },
    }
