"""Stage 2: turn per-token scores into training labels and loss weights.

``run_mask(config)`` reads ``scores.parquet`` and writes ``<out_dir>/data.parquet`` with the
scores' columns plus ``labels`` (the token id where it is trained, -100 elsewhere) and
``loss_weight`` (0 where not trained; 1 for hard masks, p(token) for ``inverse-ppl``), the
training stage's input, and ``mask_stats.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from forgetless.core.errors import DataError
from forgetless.lm import artifacts
from forgetless.core.checks import check_fraction
from forgetless.core.labels import IGNORE_INDEX
from forgetless.core.masking import POLICIES, REFERENCE_POLICIES, check_tau, weights_for_policy
from forgetless.score.stage import SCORES_FILE

logger = logging.getLogger(__name__)

MASKED_FILE = "data.parquet"


@dataclass(frozen=True)
class MaskConfig:
    """Settings of the masking stage."""

    scores: str = field(default="runs/default/scores", metadata={"help": "directory written by `forgetless score`"})
    policy: str = field(default="threshold", metadata={"help": f"one of {', '.join(POLICIES)}"})
    tau: float = field(default=2.5, metadata={"help": "perplexity threshold: mask tokens with ppl > tau (threshold, "
                                                      "dpf+stm; count to match for random/inverse; dpf: the margin of "
                                                      "ppl_tuned - ppl_base)"})
    fraction: float | None = field(default=None, metadata={"help": "target masked fraction in [0, 1) (fraction, "
                                                                   "auto-tau, reference-diff; overrides tau's "
                                                                   "count for random/inverse)"})
    per_example: bool = field(default=False, metadata={"help": "fraction policy: take the fraction within each example "
                                                               "instead of over the data set"})
    seed: int = field(default=0, metadata={"help": "seed of the random-mask control"})
    reference_scores: str | None = field(default=None, metadata={"help": "reference-diff, dpf, dpf+stm: scores "
                                                                         "directory of the second model, same data "
                                                                         "(dpf: the model fine-tuned on it)"})
    mask_highest: bool = field(default=True, metadata={"help": "reference-diff: mask the largest (nll - reference "
                                                               "nll) (else the smallest)"})
    out_dir: str = field(default="runs/default/masks/threshold", metadata={"help": "output directory"})

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        check_tau(self.tau)
        if self.policy in REFERENCE_POLICIES and not self.reference_scores:
            raise ValueError(f"policy {self.policy!r} needs reference_scores: a `forgetless score` directory of the "
                             "same data under the second model"
                             f"{' (the fine-tuned one)' if self.policy != 'reference-diff' else ''}")
        if self.fraction is not None:
            check_fraction(self.fraction, "fraction", include_0=True, include_1=False, what="the masked share")


def flatten_response_nll(table: pa.Table) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """Flat NLLs of all scored response tokens, the count per example, and each example's positions."""
    flats, sizes, positions = [], [], []
    for nll, response in zip(table.column("nll").to_pylist(), table.column("response_mask").to_pylist()):
        where = np.flatnonzero(np.asarray(response, dtype=bool))
        where = where[where > 0]  # position 0 is never scored
        flats.append(np.asarray(nll, dtype=np.float64)[where])
        sizes.append(len(where))
        positions.append(where)
    return np.concatenate(flats), sizes, positions


def apply_weights(table: pa.Table, weights: np.ndarray, sizes: list[int],
                  positions: list[np.ndarray]) -> tuple[pa.Table, dict]:
    """Add ``labels``, ``loss_weight`` and ``masked_fraction`` columns; return the table and its statistics."""
    labels, loss_weight, fractions = [], [], []
    per_example = np.split(weights, np.cumsum(sizes)[:-1])
    for ids, where, w in zip(table.column("input_ids").to_pylist(), positions, per_example):
        row_labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        row_weight = np.zeros(len(ids), dtype=np.float32)
        trained = where[w > 0]
        row_labels[trained] = np.asarray(ids)[trained]
        row_weight[where] = w
        labels.append(row_labels.tolist())
        loss_weight.append(row_weight.tolist())
        fractions.append(float(np.mean(w == 0)) if w.size else 0.0)
    table = table.append_column("labels", pa.array(labels)).append_column("loss_weight", pa.array(loss_weight))
    table = table.append_column("masked_fraction", pa.array(fractions))
    stats = {
        "response_tokens": int(weights.size),
        "trained_tokens": int(np.sum(weights > 0)),
        "masked_tokens": int(np.sum(weights == 0)),
        "masked_fraction": float(np.mean(weights == 0)),
        "mean_weight": float(np.mean(weights)),
        "per_example_masked_fraction": {"mean": float(np.mean(fractions)), "min": float(np.min(fractions)),
                                        "max": float(np.max(fractions))},
        "examples": len(sizes),
        "examples_without_trained_tokens": int(sum(1 for w in per_example if not np.any(w > 0))),
    }
    return table, stats


def run_mask(config: MaskConfig) -> Path:
    """Apply ``config.policy`` to the scores; return the output directory."""
    scores_dir, out = Path(config.scores), Path(config.out_dir)
    if not (scores_dir / artifacts.MANIFEST).is_file():
        raise FileNotFoundError(f"{scores_dir} holds no finished scores: run `forgetless score` first")
    key = {"stage": "mask", "format": 1, "scores": artifacts.read_json(scores_dir / artifacts.MANIFEST)["key"],
           "config": _policy_key(config)}
    if config.reference_scores:
        key["reference"] = artifacts.read_json(Path(config.reference_scores) / artifacts.MANIFEST)["key"]
    if artifacts.is_fresh(out, key, MASKED_FILE):
        logger.info("reusing masks in %s", out)
        return out
    table = artifacts.read_parquet(scores_dir / SCORES_FILE)
    nll, sizes, positions = flatten_response_nll(table)
    reference = None
    if config.reference_scores:
        ref_table = artifacts.read_parquet(Path(config.reference_scores) / SCORES_FILE)
        if ref_table.column("input_ids").to_pylist() != table.column("input_ids").to_pylist():
            raise DataError("reference scores are of different tokens: score the same data with the same tokenizer")
        reference = flatten_response_nll(ref_table)[0]
    weights, info = weights_for_policy(
        nll, config.policy, tau=config.tau, fraction=config.fraction, sizes=sizes if config.per_example else None,
        seed=config.seed, reference_nll=reference, mask_highest=config.mask_highest,
    )
    table, stats = apply_weights(table, weights, sizes, positions)
    stats.update(info)
    if stats["examples_without_trained_tokens"]:
        logger.warning("%d examples have no trained token left; they contribute nothing to the loss",
                       stats["examples_without_trained_tokens"])
    artifacts.write_parquet(out / MASKED_FILE, table)
    artifacts.write_json(out / "mask_stats.json", stats)
    # The τ this mask stands for (threshold, auto-tau, dpf+stm: the τ applied; random/inverse: the τ
    # whose count they match; none for policies without one, dpf's margin included), read by the report.
    tau = info.get("tau", info.get("matched_tau"))
    artifacts.write_manifest(out, key, config, policy=config.policy, tau=tau, masked_fraction=stats["masked_fraction"])
    return out


def _policy_key(config: MaskConfig) -> dict:
    return {k: v for k, v in vars(config).items() if k not in ("scores", "out_dir", "reference_scores")}

