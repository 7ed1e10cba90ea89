"""Human-readable summaries of stage outputs (rich tables on stdout)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from forgetless.lm import artifacts


def print_score_summary(out_dir: Path) -> None:
    stats = artifacts.read_json(Path(out_dir) / "stats.json")
    console = Console()
    console.print(
        f"[bold]{out_dir}[/]: {stats['scored_examples']} examples, {stats['response_tokens']} response tokens; "
        f"mean NLL {stats['mean_nll']:.3f} (corpus ppl {stats['corpus_ppl']:.2f}), token ppl mean "
        f"{stats['mean_token_ppl']:.1f} / median {stats['median_token_ppl']:.2f}; truncated {stats['truncated']}, "
        f"skipped {stats['skipped_overlong'] + stats['no_response_tokens']}"
    )
    table = Table(title="Masked fraction vs tau (share of response tokens with ppl > tau)")
    table.add_column("tau", justify="right")
    table.add_column("masked fraction", justify="right")
    table.add_column("masked tokens", justify="right")
    for tau, fraction in stats["fraction_above"].items():
        table.add_row(tau, f"{fraction:.3f}", str(round(fraction * stats["response_tokens"])))
    console.print(table)
    spikes = ", ".join(f"ppl {k}: {v}" for k, v in stats["spike_tokens"].items())
    console.print(f"ppl spikes (tokens) {spikes}; examples with a "
                  f"token over ppl 100: {stats['examples_with_spike_over_100']}")


def print_mask_summary(out_dir: Path) -> None:
    stats = artifacts.read_json(Path(out_dir) / "mask_stats.json")
    per = stats["per_example_masked_fraction"]
    tau = f", tau={stats['tau']:.4g}" if "tau" in stats else ""
    Console().print(
        f"[bold]{out_dir}[/]: policy {stats['policy']}{tau}: masked {stats['masked_tokens']} of "
        f"{stats['response_tokens']} response tokens ({stats['masked_fraction']:.1%}; per example mean "
        f"{per['mean']:.1%}, min {per['min']:.1%}, max {per['max']:.1%}); mean weight {stats['mean_weight']:.3f}; "
        f"{stats['examples_without_trained_tokens']} of {stats['examples']} examples left with no trained token"
    )

