"""Report: the forgetting table, retention and behaviour sections, frontier, plots and report.html."""

from forgetless.report.stage import ReportConfig, run_report

__all__ = ["ReportConfig", "run_report"]
