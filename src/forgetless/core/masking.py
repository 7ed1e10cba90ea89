"""Which response tokens to train on: hard masks and soft weights, as pure functions.

Every policy works on the NLLs of *scored response tokens only* (prompt tokens are never
trained on, whatever the policy) and returns a weight per token: 0 = masked (dropped from the
loss), 1 = trained, values in between for soft policies. ppl > tau is the same as
nll > log(tau); all thresholds are compared in NLL space, by the one predicate :func:`above_tau`.

Policies (``weights_for_policy``):

* ``none``       -- train every response token (ground-truth SFT).
* ``threshold``  -- mask tokens with ppl > tau (the paper's STM, tau = 2.5).
* ``fraction``   -- mask the top-q fraction by ppl, over the data set or per example.
* ``auto-tau``   -- the threshold tau whose masked fraction is closest to q without exceeding it.
* ``random``     -- mask exactly as many tokens as ``threshold`` at tau would, chosen uniformly
  without replacement among response tokens with a seeded generator (the paper's control).
* ``inverse``    -- mask the same count, but the *lowest*-ppl tokens.
* ``reference-diff`` -- mask the top-q fraction by ``nll - reference_nll`` (the difference of two
  scorings: Rho-1's excess loss), or the bottom-q with ``mask_highest=False``.
* ``dpf``        -- the authors' DPF: ``reference_nll`` is the NLL under the model fine-tuned on the
  same data; mask where ``ppl_tuned - ppl_base > tau`` (perplexity units, their
  ``generate_stm_training_data.py --stm dpf`` with their collator's threshold).
* ``dpf+stm``    -- the authors' ``--stm stm_dpf``: mask where ``ppl_base > tau`` *or*
  ``ppl_tuned > ppl_base`` (the union of STM and DPF at margin 0).
* ``inverse-ppl`` -- soft: weight = p(token) = exp(-nll) under the base model (static DFT).

The recipes of ``forgetless run`` (:data:`forgetless.core.recipes.RECIPES`) each name one of these policies; no
recipe names the others (``fraction``, ``reference-diff``, ``dpf``, ``dpf+stm``): ``forgetless mask`` runs them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from forgetless.core.checks import check_fraction
from forgetless.core.errors import ConfigError, DataError
from forgetless.core.labels import IGNORE_INDEX

HARD_POLICIES = ("none", "threshold", "fraction", "auto-tau", "random", "inverse", "reference-diff", "dpf", "dpf+stm")
REFERENCE_POLICIES = ("reference-diff", "dpf", "dpf+stm")  # need a second scoring of the same tokens
SOFT_POLICIES = ("inverse-ppl",)
POLICIES = HARD_POLICIES + SOFT_POLICIES
PAPER_TAU = 2.5  # the paper's STM threshold (perplexity units)


def check_tau(tau: float) -> None:
    if not isinstance(tau, (int, float)) or math.isnan(tau) or tau <= 0:
        raise ConfigError(f"tau is a perplexity threshold and must be > 0 (inf masks nothing); got {tau!r}")


def check_finite(nll: np.ndarray) -> None:
    """NaN scores are never silently masked or kept (inf is a real score: probability 0)."""
    bad = int(np.isnan(nll).sum())
    if bad:
        raise DataError(f"{bad} response tokens have a NaN score; re-score the data (is the model producing NaN?)")


def above_tau(nll, tau: float):
    """The one "masked at τ" test: True where a token's perplexity exceeds ``tau``, i.e. ``nll > log(tau)``.

    ``nll`` is a float, a numpy array or a torch tensor (the result has its kind); NaN is never
    above. τ = inf masks nothing.

    >>> above_tau(np.array([0.0, math.log(2.5), 1.0]), 2.5).tolist()
    [False, False, True]
    """
    return nll > math.log(tau)


def threshold_mask(nll: np.ndarray, tau: float) -> np.ndarray:
    """True where ppl > tau."""
    check_tau(tau)
    return above_tau(nll, tau)


def top_k_mask(score: np.ndarray, k: int, highest: bool = True) -> np.ndarray:
    """True at the ``k`` largest (or smallest) scores; ties broken by position, so deterministic."""
    order = np.argsort(-score if highest else score, kind="stable")
    mask = np.zeros(score.shape, dtype=bool)
    mask[order[:k]] = True
    return mask


def fraction_count(n: int, q: float) -> int:
    """Tokens masked for a fraction ``q`` of ``n``: floor(q * n), never more than asked."""
    check_fraction(q, "a masked fraction", include_0=True, include_1=False)
    return int(math.floor(q * n + 1e-9))


def fraction_mask(nll: np.ndarray, q: float, sizes: list[int] | None = None) -> np.ndarray:
    """Mask the top-q fraction by NLL over all tokens, or within each example when ``sizes`` is given."""
    if sizes is None:
        return top_k_mask(nll, fraction_count(nll.size, q))
    parts = np.split(nll, np.cumsum(sizes)[:-1])
    return np.concatenate([top_k_mask(p, fraction_count(p.size, q)) for p in parts])


def tau_for_fraction(nll: np.ndarray, q: float) -> float:
    """The tau whose threshold mask (ppl > tau) masks the most tokens without exceeding fraction q."""
    if nll.size == 0:
        raise ConfigError("no tokens to choose a threshold from")
    k = fraction_count(nll.size, q)  # < nll.size because q < 1
    ordered = np.sort(nll)[::-1]
    # Mask exactly the tokens strictly above the (k+1)-th largest NLL (ties stay unmasked).
    return math.exp(float(ordered[k]))


def dpf_mask(base_nll: np.ndarray, tuned_nll: np.ndarray, margin: float) -> np.ndarray:
    """True where the fine-tuned model's perplexity exceeds the base's by more than ``margin``.

    The authors' inequality, in perplexity units: ``exp(tuned_nll) - exp(base_nll) > margin``
    (not in NLL units: ``ppl_tuned - ppl_base > 2.5`` is not ``nll_tuned - nll_base > log 2.5``).
    Both perplexities infinite gives NaN, never above.

    >>> dpf_mask(np.log([2.0, 2.0, 4.0]), np.log([1.0, 5.0, 4.5]), 2.5).tolist()
    [False, True, False]
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(tuned_nll) - np.exp(base_nll) > margin


def random_mask(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of ``n`` positions, uniformly without replacement, reproducible for a seed."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot mask {k} of {n} tokens")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return mask


def weights_for_policy(
    nll: np.ndarray,
    policy: str,
    *,
    tau: float = PAPER_TAU,
    fraction: float | None = None,
    sizes: list[int] | None = None,
    seed: int = 0,
    reference_nll: np.ndarray | None = None,
    mask_highest: bool = True,
) -> tuple[np.ndarray, dict]:
    """Per-token weights (float64, in [0, 1]) for the flat response-token NLLs of a data set.

    ``sizes`` gives the response-token count of each example (for per-example fractions);
    ``reference_nll`` a second scoring of the same tokens (the fine-tuned model's for ``dpf``).
    Returns the weights and the resolved parameters (e.g. the tau that ``auto-tau`` found).
    """
    nll = np.asarray(nll, dtype=np.float64)
    check_finite(nll)
    info: dict = {"policy": policy}
    if policy == "none":
        masked = np.zeros(nll.shape, dtype=bool)
    elif policy == "threshold":
        masked, info["tau"] = threshold_mask(nll, tau), tau
    elif policy == "fraction":
        masked, info["fraction"] = fraction_mask(nll, _need(fraction, policy), sizes), fraction
    elif policy == "auto-tau":
        info["tau"] = tau_for_fraction(nll, _need(fraction, policy))
        masked = threshold_mask(nll, info["tau"])
    elif policy in ("random", "inverse"):
        k = int(threshold_mask(nll, tau).sum()) if fraction is None else fraction_count(nll.size, fraction)
        masked = random_mask(nll.size, k, seed) if policy == "random" else top_k_mask(nll, k, highest=False)
        info.update(matched_tau=tau if fraction is None else None, matched_fraction=fraction, seed=seed)
    elif policy == "reference-diff":
        k = fraction_count(nll.size, _need(fraction, policy))
        masked = top_k_mask(nll - _reference(reference_nll, nll, policy), k, highest=mask_highest)
        info.update(fraction=fraction, mask_highest=mask_highest)
    elif policy == "dpf":
        check_tau(tau)
        masked, info["ppl_margin"] = dpf_mask(nll, _reference(reference_nll, nll, policy), tau), tau
    elif policy == "dpf+stm":
        tuned = _reference(reference_nll, nll, policy)
        masked, info["tau"] = threshold_mask(nll, tau) | dpf_mask(nll, tuned, 0.0), tau
        info["masked_by_dpf_only"] = int((masked & ~threshold_mask(nll, tau)).sum())
    elif policy == "inverse-ppl":
        return np.exp(-nll), info
    else:
        raise ConfigError(f"unknown masking policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return (~masked).astype(np.float64), info


def _reference(reference_nll, nll: np.ndarray, policy: str) -> np.ndarray:
    """The second scoring (float64, checked finite-or-inf) of the same tokens as ``nll``."""
    if reference_nll is None or np.shape(reference_nll) != nll.shape:
        raise ConfigError(f"{policy} needs reference scores of the same tokens (same data and tokenizer)")
    reference_nll = np.asarray(reference_nll, dtype=np.float64)
    check_finite(reference_nll)
    return reference_nll


def _need(fraction: float | None, policy: str) -> float:
    if fraction is None:
        raise ConfigError(f"policy {policy!r} needs a target fraction (fraction=q, 0 <= q < 1)")
    check_fraction(fraction, "a masked fraction", include_0=True, include_1=False)
    return fraction


def stm_labels(labels: torch.Tensor, nll: torch.Tensor, tau: float = PAPER_TAU) -> torch.Tensor:
    """STM for your own trainer: set ``labels`` to -100 where the base model's ppl > tau.

    ``labels`` is ``(B, T)`` with -100 at non-trained positions; ``nll`` is ``(B, T)``, aligned
    with ``input_ids`` (``nll[b, i]`` scores token ``i``, as written by ``forgetless score``).
    Tokens already ignored stay ignored; a trained token with a NaN score raises.
    """
    check_tau(tau)
    trained = labels != IGNORE_INDEX
    if torch.isnan(nll[trained]).any():
        raise ValueError("a trained token has a NaN score: is `nll` aligned with `labels`?")
    return labels.masked_fill(trained & above_tau(nll, tau), IGNORE_INDEX)
