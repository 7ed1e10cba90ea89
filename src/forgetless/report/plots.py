"""The report's training plots: loss curves, weight-update size, and per-token perplexity distributions.

Each function reads plain files a stage wrote (``loss.jsonl`` and ``diagnostics.json`` of a train
run, ``scores.parquet`` of a score run) and writes one PNG atomically; it returns None, writing
nothing, when there is nothing to draw.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from forgetless.lm import artifacts

PPL_AXIS_MAX = 1e4


def read_loss_curve(train_dir: str | Path) -> tuple[list[int], list[float]]:
    """(steps, per-token training NLL) from a train run's ``loss.jsonl``; empty when it has none."""
    path = Path(train_dir) / "loss.jsonl"
    steps, nll = [], []
    if not path.is_file():
        return steps, nll
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        value = record.get("nll_per_token", record.get("loss"))
        if "step" in record and value is not None:
            steps.append(int(record["step"]))
            nll.append(float(value))
    return steps, nll


def response_ppl(scores_file: str | Path) -> np.ndarray:
    """Per-token perplexity exp(nll) of every scored response token in a ``scores.parquet`` (NaN rows dropped)."""
    table = artifacts.read_parquet(scores_file, columns=["nll", "response_mask"])
    values = []
    for nll, mask in zip(table.column("nll").to_pylist(), table.column("response_mask").to_pylist()):
        values += [v for v, m in zip(nll, mask) if m and v is not None and not math.isnan(v)]
    return np.exp(np.asarray(values, dtype=np.float64))


def can_plot() -> bool:
    """True when matplotlib is installed (the ``[report]`` extra); without it the report has no figures, and says so
    once."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        return True
    if not _warned:
        _warned.append(True)
        logging.getLogger(__name__).warning("no plots in the report: matplotlib is not installed "
                                            "(pip install 'forgetless[report]')")
    return False


_warned: list[bool] = []


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write atomically and close ``fig``."""
    fig.tight_layout()
    artifacts.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    _pyplot().close(fig)
    return path


def plot_loss_curves(train_dirs: dict[str, str | Path], path: Path) -> Path | None:
    """Per-token training NLL against step, one line per run (the loss each method optimises)."""
    curves = {label: read_loss_curve(d) for label, d in train_dirs.items()}
    curves = {label: c for label, c in curves.items() if c[0]}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (steps, nll) in curves.items():
        ax.plot(steps, nll, marker="." if len(steps) < 40 else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training NLL per trained token")
    ax.set_title("Training loss (over the tokens each method trains on)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_delta_w(norms: dict[str, float | None], path: Path) -> Path | None:
    """‖ΔW‖ (Frobenius norm of the whole weight update) per run, as bars."""
    norms = {label: v for label, v in norms.items() if v is not None}
    if not norms:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(norms) + 2), 4))
    ax.bar(range(len(norms)), list(norms.values()), color="#4c72b0")
    ax.set_xticks(range(len(norms)), list(norms), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("‖ΔW‖ (Frobenius, all adapted modules)")
    ax.set_title("Size of the weight update per method")
    return save_figure(fig, path)


def plot_ppl_distribution(scores_files: dict[str, str | Path], path: Path, taus: list[float] = ()) -> Path | None:
    """Histogram of per-token perplexity (log axis) of each data set's responses under the base model."""
    ppl = {label: response_ppl(f) for label, f in scores_files.items()}
    ppl = {label: v for label, v in ppl.items() if v.size}
    if not ppl:
        return None
    plt = _pyplot()
    top = min(PPL_AXIS_MAX, max(float(v.max()) for v in ppl.values()))
    bins = np.logspace(0, math.log10(max(top, 10.0)) + 0.05, 40)
    ppl = {label: np.minimum(v, bins[-1] * 0.999) for label, v in ppl.items()}  # the last bin holds everything above
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in ppl.items():
        weights = np.full(values.size, 1.0 / values.size)
        ax.hist(values, bins=bins, weights=weights, histtype="step", lw=1.5,
                label=f"{label} (n={values.size}, median {np.median(values):.2f})")
    for tau in sorted(set(t for t in taus if math.isfinite(t))):
        ax.axvline(tau, color="grey", ls="--", lw=0.8)
        ax.annotate(f"τ={tau:g}", (tau, ax.get_ylim()[1] * 0.9), fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"per-token perplexity under the base model (last bin: ≥ {bins[-1]:.3g})")
    ax.set_ylabel("share of response tokens")
    ax.set_title("Response-token perplexity by data source")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_masked_fraction(scores_file: str | Path, points: dict[str, tuple[float, float]], path: Path) -> Path | None:
    """The threshold policy's masked fraction at every τ (from the scored training data), with
    the score stage's τ sweep marked and each method's operating point (τ, masked fraction) on it.

    Methods at the same point (STM and its same-count random mask) share one label.
    """
    ppl = response_ppl(scores_file)
    if not ppl.size:
        return None
    plt = _pyplot()
    taus = np.logspace(0, math.log10(max(PPL_AXIS_MAX, 10.0)), 200)
    sorted_ppl = np.sort(ppl)
    above = 1.0 - np.searchsorted(sorted_ppl, taus, side="right") / sorted_ppl.size  # share with ppl > τ
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(taus, above, color="C0", lw=1.5, label=f"threshold policy (n={ppl.size} response tokens)")
    stats_file = Path(scores_file).parent / "stats.json"
    if stats_file.is_file():
        sweep = json.loads(stats_file.read_text()).get("fraction_above", {})
        ax.plot([float(t) for t in sweep], list(sweep.values()), "o", color="C0", ms=4, label="score stage's τ sweep")
    grouped: dict[tuple[float, float], list[str]] = {}
    for label, (tau, frac) in points.items():
        if tau is not None and frac is not None and math.isfinite(tau):
            grouped.setdefault((round(tau, 6), round(frac, 4)), []).append(label)
    for k, ((tau, frac), labels) in enumerate(sorted(grouped.items())):
        ax.plot([tau], [frac], "s", color=f"C{k + 1}", ms=7)
        ax.annotate(", ".join(labels) + f"\n(τ={tau:g}, {100 * frac:.1f}%)", (tau, frac), textcoords="offset points",
                    xytext=(8, 6 + 14 * (k % 3)), fontsize=7, color=f"C{k + 1}")
    ax.set_xscale("log")
    ax.set_xlabel("τ (perplexity threshold)")
    ax.set_ylabel("masked fraction of response tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
