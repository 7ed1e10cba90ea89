"""What ``forgetless run`` says at its end: one verdict line per recipe (the change on the target and on the other
measures against the base, with paired 95% intervals), the path of report.html, and the same line in each trained
model's card."""

from __future__ import annotations

from pathlib import Path

from forgetless.lm import artifacts


def verdict_lines(report: dict) -> list[str]:
    """One line per recipe: its change on the target and on the other measures against the base, each with its
    paired 95% interval (absolute differences: TI_abs and BWT_abs of the report)."""
    from forgetless.report.stage import point_intervals

    def shown(value, lo, hi) -> str:
        if value is None:
            return "n/a"
        interval = "" if lo != lo else f" [{lo:+.3f}, {hi:+.3f}]"  # NaN: no paired items
        return f"{value:+.3f}{interval}"

    lines = []
    for row in report["rows"]:
        if row["is_base"]:
            continue
        (ti, ti_lo, ti_hi), (bwt, bwt_lo, bwt_hi) = point_intervals(row, report, relative=False)
        lines.append(f"{row['label']}: target ({report['target']}) {shown(ti, ti_lo, ti_hi)}, "
                     f"other measures (BWT) {shown(bwt, bwt_lo, bwt_hi)}")
    return lines


def grid_verdict_lines(out: Path) -> list[str]:
    """The verdict sentences of a grid's report (``verdicts.json``: wins / loses / equivalent / not resolved, each
    with its difference, interval and n), same dose first; none when the report has no verdict block."""
    from forgetless.report.verdicts import VERDICTS_FILE, render_verdicts

    path = Path(out) / VERDICTS_FILE
    if not path.is_file():
        return []
    return [line for line in render_verdicts(artifacts.read_json(path)).splitlines() if line.startswith("- ")]


def print_verdict(out: Path) -> None:
    """``forgetless run``'s last lines: the grid's verdicts (when it has them), the change of each recipe against
    the base, and where the whole report is."""
    verdicts = grid_verdict_lines(out)
    if verdicts:
        print("verdicts (reference against each rival; report.md explains the tests):")
        for line in verdicts:
            print(line)
    report = artifacts.read_json(Path(out) / "report.json")
    print(f"vs base {report['base']} (change, paired 95% interval):")
    for line in verdict_lines(report):
        print(line)
    print(f"report: {Path(out) / 'report.html'}")


def fill_model_cards(report_dir: Path, train_dirs: dict[str, Path]) -> None:
    """Each trained model's card gets its verdict line (target and retention deltas) from the report."""
    from forgetless.train.card import add_measured

    report = artifacts.read_json(Path(report_dir) / "report.json")
    lines = dict(zip([r["label"] for r in report["rows"] if not r["is_base"]], verdict_lines(report)))
    for label, train_dir in train_dirs.items():
        group = label.split("@s")[0]
        if group in lines:
            for weights in ("adapter", "model"):
                add_measured(train_dir / weights, [lines[group]], str(Path(report_dir) / "report.html"))

