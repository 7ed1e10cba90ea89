"""The ``report`` stage: the paper's Table 1 from several eval runs, plus plots.

TI (target improvement) = (tuned - base) / base on the target task; BWT (backward transfer) =
mean over non-target tasks of (tuned - base) / base. Both are also given as absolute
differences. A relative change against a base score of 0 is undefined: it is reported as null
with the reason, and BWT averages only the tasks where it is defined (listed). Tasks whose
metric is lower-is-better (drift measures) are shown but left out of TI/BWT.

Writes ``report.md``, ``report.json``, ``bwt_vs_ti.png``, ``report.html`` (tables, plots and
a token view) and, when the inputs carry them, ``masked_fraction_vs_tau.png``,
``training_loss.png``, ``delta_w.png`` and ``token_ppl_distribution.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgetless.core.errors import ConfigError
from forgetless.lm.artifacts import write_text
from forgetless.core.intervals import paired_difference
from forgetless.report.behaviour import lean
from forgetless.report.cells import MISSING, cell, interval, is_missing, number
from forgetless.report.forgetting import forgetting_metrics, is_sub_measure, point_intervals
from forgetless.report.forgetting import relative_change  # noqa: F401  (re-exported)
from forgetless.report.frontier import build_frontier, write_frontier
from forgetless.report.sections import retention_section, train_extras
from forgetless.report.verdicts import plain_name, verdict_section
from forgetless.report.html import PPL_DARKEST, read_token_examples, write_html
from forgetless.report.plots import (can_plot, plot_delta_w, plot_loss_curves, plot_masked_fraction,
                                     plot_ppl_distribution, save_figure)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ReportConfig:
    run_dir: str | None = field(default=None, metadata={"help": "a `forgetless run` output directory: its whole "
                                                                "report, exactly as `forgetless run` writes it (the "
                                                                "other fields are read from its run_config.json)"})
    runs: tuple[str, ...] = field(default=(), metadata={"help": "label=eval_dir entries; the base run among them; "
                                                                "a repeated label merges its dirs' "
                                                                "tasks (eval + retention)"})
    output_dir: str | None = field(default=None, metadata={"help": "directory for report.md/json and plots (default: "
                                                                   "RUN_DIR/report, or runs/report)"})
    base: str | None = field(default=None,
                             metadata={"help": "label of the base run (default: 'base' if present, else the first)"})
    target: str = field(default="mbpp",
                        metadata={"help": "the fine-tuning target task; every other task is non-target"})
    train_dirs: tuple[str, ...] = field(default=(), metadata={"help": "label=train_dir entries with "
                                                                      "train_summary/diagnostics json"})
    tasks: tuple[str, ...] = field(default=(), metadata={"help": "tasks to show, in order; BWT averages these "
                                                                 "(default: all found)"})
    scores: tuple[str, ...] = field(default=(), metadata={"help": "label=scores.parquet entries (e.g. ground truth, "
                                                                  "self-output) for the per-token "
                                                                  "ppl distribution plot"})
    token_view: str | None = field(default=None, metadata={"help": "a mask stage's data.parquet (or a scores.parquet): "
                                                                   "its first examples shown token by "
                                                                   "token in report.html"})
    token_view_examples: int = field(default=3, metadata={"help": "examples in the token view"})
    tokenizer: str | None = field(default=None, metadata={"help": "model whose tokenizer decodes the token view "
                                                                  "(default: the model in the scores' manifest)"})
    recipe_sources: tuple[str, ...] = field(default=(), metadata={"help": "label=source: the prompt source a recipe "
                                                                          "trains on (replay's, Self-Output's); a "
                                                                          "measure drawn from it is labelled as "
                                                                          "favouring that recipe"})

    def __post_init__(self):
        for name in ("runs", "train_dirs", "tasks", "scores", "recipe_sources"):
            value = getattr(self, name)
            if isinstance(value, (str, list)):
                object.__setattr__(self, name, tuple([value] if isinstance(value, str) else value))
        if self.run_dir is None and len(self.runs) < 1:
            raise ValueError("runs: give at least the base run as label=eval_dir (or a run directory: "
                             "forgetless report RUN_DIR)")
        if self.output_dir is None:
            object.__setattr__(self, "output_dir",
                               str(Path(self.run_dir) / "report") if self.run_dir else "runs/report")
        labels = [parse_labelled(r)[0] for r in self.runs]
        if self.base is not None and self.base not in labels:
            raise ValueError(f"base {self.base!r} is not one of the run labels {labels}")


def parse_labelled(entry: str) -> tuple[str, str]:
    """'label=path' -> (label, path); a bare path is labelled with its directory name."""
    label, sep, path = entry.partition("=")
    return (label, path) if sep else (Path(entry).name, entry)


# --- loading --------------------------------------------------------------------------------

def load_scores(path: str | Path) -> dict[str, dict]:
    """task -> score record from an eval dir (scores.json or per-task <task>.json; also <path>/eval)."""
    path = Path(path)
    for directory in (path, path / "eval"):
        if (directory / "scores.json").is_file():
            return json.loads((directory / "scores.json").read_text())
        found = {}
        for f in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            try:
                record = json.loads(f.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and {"task", "score", "n"} <= set(record):
                found[record["task"]] = record
        if found:
            return found
    raise FileNotFoundError(f"{path}: no scores.json or <task>.json results")


def load_item_scores(path: str | Path, task: str) -> dict[str, float] | None:
    for directory in (Path(path), Path(path) / "eval"):
        f = directory / f"{task}.items.jsonl"
        if f.is_file():
            return {r["id"]: float(r["score"]) for r in map(json.loads, f.read_text().splitlines())
                    if r.get("score") is not None}
    return None


def merge_scores(label: str, paths: list[str]) -> dict[str, dict]:
    """task -> record over all of a label's dirs; a task found twice keeps the first (with a warning)."""
    merged: dict[str, dict] = {}
    for path in paths:
        for task, record in load_scores(path).items():
            if task in merged:
                logger.warning("report: %s has task %s in more than one dir; keeping the first", label, task)
                continue
            merged[task] = {**record, "_dir": path}
    return merged


# --- the report -----------------------------------------------------------------------------

def _with_interval(v: tuple | None, percent: bool, n: int | None = None) -> str:
    """A TI / BWT cell: the value (signed as a percent, unsigned as an absolute difference), its paired 95% interval
    (signed) when there is one, and n (the target's items)."""
    if v is None or is_missing(v[0]):
        return MISSING
    digits = 1 if percent else 3
    return (number(v[0], digits, signed=percent, percent=percent)
            + interval(v[1:], digits, signed=True, percent=percent) + (f" n={n}" if n else ""))


def _task_cell(record: dict | None) -> str:
    """A task's score [95% interval] n=items."""
    if record is None:
        return MISSING
    return cell(record.get("score"), record.get("ci95"), ci_digits=2, n=record.get("n"))


def build_report(cfg: ReportConfig) -> dict[str, Any]:
    groups: dict[str, list[str]] = {}
    for label, path in map(parse_labelled, cfg.runs):
        groups.setdefault(label, []).append(path)
    labels = list(groups)
    base_label = cfg.base or ("base" if "base" in labels else labels[0])
    scores = {label: merge_scores(label, paths) for label, paths in groups.items()}
    train = dict(parse_labelled(t) for t in cfg.train_dirs)
    tasks = list(cfg.tasks) or sorted({t for s in scores.values() for t in s}, key=lambda t: (t != cfg.target, t))
    lower = frozenset(t for s in scores.values() for t, r in s.items() if r.get("higher_is_better") is False)
    # TI/BWT use only the tasks shown, so sub-records (e.g. a drift task's top-1 agreement) do not enter BWT.
    base_scores = {t: r["score"] for t, r in scores[base_label].items() if r.get("score") is not None and t in tasks}
    rows = []
    for label, paths in groups.items():
        run_scores = {t: r["score"] for t, r in scores[label].items() if r.get("score") is not None}
        row = {"label": label, "paths": paths, "is_base": label == base_label,
               "tasks": {t: _public(scores[label].get(t)) for t in tasks},
               "extras": train_extras(train.get(label))}
        if label != base_label:
            row["metrics"] = forgetting_metrics(base_scores, run_scores, cfg.target, lower)
            row["paired"] = {}
            for t in tasks:
                if t in scores[base_label] and t in scores[label]:
                    b = load_item_scores(scores[base_label][t]["_dir"], t)
                    u = load_item_scores(scores[label][t]["_dir"], t)
                    if b and u:
                        row["paired"][t] = paired_difference(u, b)
        rows.append(row)
    return {"base": base_label, "target": cfg.target, "tasks": tasks, "lower_is_better": sorted(lower), "rows": rows,
            "leans": {t: lean(t, cfg.recipe_sources) for t in tasks},
            "definitions": {"TI": "(tuned - base) / base on the target task",
                            "BWT": "mean over non-target tasks of (tuned - base) / base",
                            "TI_abs/BWT_abs": "the same as absolute differences",
                            "ci95": "Wilson (accuracy) or bootstrap 95% interval",
                            "paired": "mean per-item difference tuned - base on shared item ids, paired "
                                      "bootstrap 95% interval"}}


def _public(record: dict | None) -> dict | None:
    return None if record is None else {k: v for k, v in record.items() if k != "_dir"}


def render_markdown(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    base = next(r for r in report["rows"] if r["is_base"])["tasks"]
    plain = {t: plain_name(t, (base.get(t) or {}).get("metric")) for t in tasks}
    head = ["run", *[f"{plain[t]}{' (target)' if t == report['target'] else ''}" for t in tasks],
            "TI", "TI abs", "BWT", "BWT abs", "masked frac", "τ", "‖ΔW‖", "train time"]
    lines = [f"# Forgetting report (target: {report['target']}, base: {report['base']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for row in report["rows"]:
        m = row.get("metrics", {})
        ex = row["extras"]
        ti, bwt = point_intervals(row, report, True) if m else (None, None)
        ti_abs, bwt_abs = point_intervals(row, report, False) if m else (None, None)
        n_target = (row.get("paired", {}).get(report["target"]) or {}).get("n")
        cells = [row["label"], *[_task_cell(row["tasks"].get(t)) for t in tasks],
                 _with_interval(ti, True, n_target), _with_interval(ti_abs, False, n_target),
                 _with_interval(bwt, True), _with_interval(bwt_abs, False),
                 number(ex["masked_fraction"]), number(ex["tau"], 2), number(ex["delta_w_norm"], 4),
                 MISSING if ex.get("train_time_s") is None else f"{ex['train_time_s']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"{row['label']}: {n}" for n in m.get("notes", [])]
    paired = [r for r in report["rows"] if r.get("paired")]
    if paired:
        lines += ["", "Change vs base on the same items (mean difference, paired bootstrap 95% interval):", "",
                  "| run | " + " | ".join(plain[t] for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        for row in paired:
            cells = []
            for t in tasks:
                d = row["paired"].get(t)
                cells.append(cell(d["mean"], d["ci95"], signed=True, ci_digits=2, n=d["n"]) if d and d["n"]
                             else MISSING)
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: score [95% interval] n=items. TI = (tuned − base)/base on the target; BWT = mean over "
              "non-target tasks of (tuned − base)/base; 'abs' = absolute differences. ARC-Challenge here is generative "
              "(the model writes the letter, the paper's way); log-likelihood multiple-choice tasks are named as such."]
    if report["lower_is_better"]:
        lines.append(f"Lower-is-better tasks, shown but not in TI/BWT: {', '.join(report['lower_is_better'])}.")
    subs = [t for t in tasks if is_sub_measure(t) and t not in report["lower_is_better"]]
    if subs:
        lines.append(f"Details of a behaviour set, shown but not in BWT: {', '.join(subs)}.")
    lines += ["", "Which way each measure leans:"] + [f"- {plain[t]} (`{t}`): "
                                                      f"{report.get('leans', {}).get(t) or lean(t)}"
                                                     for t in tasks]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], out: Path) -> list[Path]:
    """``bwt_vs_ti.png``: every tuned model's BWT against its TI, each with its 95% interval on both axes (paired
    against the base on the same items): a point whose bars cross zero is not a measured change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = [r for r in report["rows"] if "metrics" in r]
    use_rel = all(r["metrics"]["TI"] is not None and r["metrics"]["BWT"] is not None for r in tuned)
    kx, ky = ("TI", "BWT") if use_rel else ("TI_abs", "BWT_abs")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in tuned:
        if row["metrics"][kx] is None or row["metrics"][ky] is None:
            continue
        (x, xlo, xhi), (y, ylo, yhi) = point_intervals(row, report, use_rel)
        xerr = None if math.isnan(xlo) else [[max(x - xlo, 0.0)], [max(xhi - x, 0.0)]]
        yerr = None if math.isnan(ylo) else [[max(y - ylo, 0.0)], [max(yhi - y, 0.0)]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, lw=1)
        ax.annotate(row["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel(f"{kx} (target: {report['target']})")
    ax.set_ylabel(f"{ky} (non-target)")
    ax.set_title("Backward transfer vs target improvement\n(bars: paired 95% intervals against the base)", fontsize=10)
    return [save_figure(fig, out / "bwt_vs_ti.png")]


def run_report(cfg: ReportConfig, frontier_grid: dict | None = None) -> Path:
    """Write report.md (the table, then the retention and behaviour sections when the runs have
    retention records, then the frontier of ``frontier_grid``: :func:`forgetless.report.frontier.build_frontier`'s
    arguments), report.json, the plots and report.html into ``cfg.output_dir``. A ``run_dir`` is read by the layer
    that knows a run's layout: :func:`forgetless.run.report_run` (``forgetless report RUN_DIR``)."""
    if cfg.run_dir:
        raise ConfigError(f"run_dir={cfg.run_dir}: a run directory is reported by forgetless.run.report_run "
                         "(`forgetless report RUN_DIR`), which reads its layout")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(cfg)
    groups: dict[str, list[str]] = {}
    for label, path in map(parse_labelled, cfg.runs):
        groups.setdefault(label, []).append(path)
    opening = ""
    if frontier_grid is not None:
        frontier = dict(frontier_grid)
        verdicts = frontier.pop("verdicts", None)  # a run's `frontier: {verdicts: {...}}` (a VerdictConfig)
        base_eval = frontier.pop("base_eval_dir", None)  # where a run's target is an eval task (its held-out share)
        write_frontier(out, build_frontier(**frontier, target=cfg.target))
        opening = verdict_section(out, frontier["grid"], Path(frontier["base_dir"]), cfg.target, verdicts,
                                  Path(base_eval) if base_eval else None)
    markdown = opening + render_markdown(report) + retention_section(out, groups, report["base"], cfg.target)
    for name, text in (("report.md", markdown), ("report.json", json.dumps(report, indent=2, default=str) + "\n"),
                       ("config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")):
        write_text(out / name, text)
    if can_plot():
        plot_report(report, out)
        plot_training(cfg, report, out)
    write_report_html(cfg)
    return out


def plot_training(cfg: ReportConfig, report: dict[str, Any], out: Path) -> None:
    """Loss curves and ‖ΔW‖ of the train runs, and the ppl distribution of each scored data set."""
    train = dict(parse_labelled(t) for t in cfg.train_dirs)
    plot_loss_curves(train, out / "training_loss.png")
    plot_delta_w({r["label"]: r["extras"]["delta_w_norm"] for r in report["rows"] if not r["is_base"]},
                 out / "delta_w.png")
    taus = [r["extras"]["tau"] for r in report["rows"] if r["extras"]["tau"] is not None]
    plot_ppl_distribution(dict(parse_labelled(s) for s in cfg.scores), out / "token_ppl_distribution.png", taus)
    if cfg.scores:  # the first scored data set is the training data the masks were drawn from
        points = {r["label"]: (r["extras"]["tau"], r["extras"]["masked_fraction"]) for r in report["rows"]
                  if not r["is_base"]}
        plot_masked_fraction(parse_labelled(cfg.scores[0])[1], points, out / "masked_fraction_vs_tau.png")


def _manifest_model(data_file: Path) -> str | None:
    """The model named in the manifest of a score stage (or of the score stage a mask stage read)."""
    manifest = data_file.parent / "manifest.json"
    if not manifest.is_file():
        return None
    config = json.loads(manifest.read_text()).get("config", {})
    if "model" in config:
        return config["model"]
    return _manifest_model(Path(config["scores"]) / "scores.parquet") if config.get("scores") else None


def write_report_html(cfg: ReportConfig) -> Path:
    """report.html from everything now in the report directory, plus the token view of ``cfg.token_view``."""
    examples, caption = None, ""
    if cfg.token_view:
        data_file = Path(cfg.token_view)
        model = cfg.tokenizer or _manifest_model(data_file)
        if model is None:
            raise ConfigError(f"token_view: no tokenizer given and none named in {data_file.parent / 'manifest.json'}")
        from forgetless.lm.modeling import load_tokenizer

        tokenizer = load_tokenizer(model)
        examples = read_token_examples(data_file, tokenizer.decode, cfg.token_view_examples)
        caption = (f"Responses from {data_file}, tokens shaded by their perplexity under the base model "
                   f"(white: ppl 1, darkest: ppl ≥ {PPL_DARKEST:g}); struck-through tokens are masked out of the loss. "
                   "Hover a token for its ppl.")
    return write_html(cfg.output_dir, examples, caption)


def print_report(out: Path) -> None:
    """Print the Markdown table (the CLI's printer for this stage)."""
    print((Path(out) / "report.md").read_text(encoding="utf-8"))
    print(f"report and plots in {out}")
