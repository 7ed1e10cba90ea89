"""The report's parts beyond the main table: what a training run says about itself, and the
retention and behaviour sections (written when the runs include retention records).

Everything here reads files the stages wrote under their own names: ``train_summary.json`` and
``diagnostics.json`` of a train run, the ``manifest.json`` of the mask stage it trained on (its
``tau`` and ``masked_fraction`` fields), and the retention records.
"""

from __future__ import annotations

import json
from pathlib import Path

from forgetless.lm import artifacts

EXTRAS = ("masked_fraction", "tau", "delta_w_norm", "train_time_s")


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def train_extras(train_dir: str | Path | None) -> dict[str, float | None]:
    """masked_fraction and τ (from the mask stage's manifest), ‖ΔW‖_F and wall time of a train run."""
    extras: dict[str, float | None] = dict.fromkeys(EXTRAS)
    if train_dir is None:
        return extras
    train_dir = Path(train_dir)
    summary = _read(train_dir / "train_summary.json")
    extras["train_time_s"] = summary.get("wall_time_s")
    extras["masked_fraction"] = summary.get("table", {}).get("masked_fraction")
    extras["delta_w_norm"] = _read(train_dir / "diagnostics.json").get("total_frobenius")
    data = _read(train_dir / "config.json").get("data")
    if isinstance(data, str):
        mask_manifest = _read(Path(data).parent / artifacts.MANIFEST)
        extras["tau"] = mask_manifest.get("tau")
        if extras["masked_fraction"] is None:
            extras["masked_fraction"] = mask_manifest.get("masked_fraction")
    return extras


def is_retention_dir(path: str | Path) -> bool:
    return _read(Path(path) / artifacts.MANIFEST).get("stage") == "retention"


RETENTION_INTRO = (
    "\n## Retention, paired against the base model\n\n"
    "BWT here averages only accuracy tasks where the base is above chance; MC retention is the share of the base's "
    "above-chance multiple-choice skill left (1 = nothing lost); working kept is the share of the base's working left "
    "on non-target prompts (see the behaviour section); drift is the mean per-token KL between base and tuned "
    "next-token distributions on non-target prompts and the base's own answers (both directions: KL(base‖tuned) also "
    "charges sharpening toward what the base already believed); target gain is the paired change of the target task "
    "(neutral), and the drop in held-out NLL on tokens of the kind STM keeps (base ppl ≤ τ; favours STM by "
    "construction) and of the kind it masks (favours ground truth by construction). Brackets: 95% intervals.\n\n")


def retention_section(report_dir: Path, groups: dict[str, list[str]], base: str, target: str) -> str:
    """The retention and behaviour sections (Markdown), with ``retention.json`` and
    ``drift_vs_gain.png``; empty when the base or every method lacks retention records."""
    from forgetless.report.behaviour import behaviour_markdown
    from forgetless.report.plots import can_plot
    from forgetless.report.retention import markdown_table, plot_drift_vs_gain, summarize_run

    dirs = {label: next((Path(p) for p in paths if is_retention_dir(p)), None) for label, paths in groups.items()}
    dirs = {label: d for label, d in dirs.items() if d is not None}
    methods = [label for label in dirs if label != base]
    if base not in dirs or not methods:
        return ""
    summaries = {label: summarize_run(dirs[base], dirs[label], target_task=target) for label in methods}
    artifacts.write_json(report_dir / "retention.json", summaries)
    if can_plot():
        plot_drift_vs_gain(summaries, report_dir / "drift_vs_gain.png")
    return RETENTION_INTRO + markdown_table(summaries) + behaviour_markdown(summaries, {m: dirs[m] for m in methods})
