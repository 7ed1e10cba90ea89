"""The model card of a trained adapter or model: ``README.md`` beside its weights (what the hub shows when it is
pushed). The train stage writes what it knows (recipe, τ, masked fraction, data fingerprint); ``forgetless run``
adds the measured changes (target and retention deltas against the base) once the report exists."""

from __future__ import annotations

import json
from pathlib import Path

from forgetless.lm import artifacts

CARD = "README.md"
MEASURED = "## Measured against the base"


def mask_facts(data: str | Path) -> dict:
    """Policy, τ and masked fraction of a training table made by the masking stage (its ``manifest.json``);
    empty for a table made otherwise."""
    manifest = Path(data).parent / "manifest.json"
    try:
        found = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: found.get(k) for k in ("policy", "tau", "masked_fraction") if k in found}


def card_text(config, manifest: dict, counts: dict, facts: dict) -> str:
    """The card's Markdown: settings first, then a placeholder the run replaces with measured deltas."""
    tau, fraction = facts.get("tau"), facts.get("masked_fraction", counts.get("masked_fraction"))
    rows = [("base model", config.model), ("recipe", f"{config.method} (masking policy: {facts.get('policy', 'n/a')})"),
            ("τ (perplexity threshold)", "n/a" if tau is None else f"{tau:g}"),
            ("masked fraction of response tokens", "n/a" if fraction is None else f"{fraction:.1%}"),
            ("adapter", config.adapter), ("learning rate", f"{config.learning_rate:g}"),
            ("epochs", f"{config.epochs:g}"),
            ("training examples", counts.get("examples", "n/a")), ("data fingerprint", manifest["data_fingerprint"]),
            ("forgetless", manifest["forgetless"])]
    lines = ["---", "library_name: peft" if config.adapter != "full" else "library_name: transformers",
             f"base_model: {config.model}", "tags: [forgetless, selective-token-masking]", "---", "",
             f"# {Path(config.output_dir).name}: fine-tuned with forgetless", "",
             "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             MEASURED, "", "Not measured yet (`forgetless run` fills this in after its report).", ""]
    return "\n".join(lines)


def write_card(weights_dir: Path, text: str) -> Path:
    path = Path(weights_dir) / CARD
    artifacts.write_text(path, text)
    return path


def add_measured(weights_dir: Path, lines: list[str], report_path: str) -> None:
    """Replace the card's measured section with ``lines`` (the run's verdict for this model)."""
    path = Path(weights_dir) / CARD
    if not path.is_file():
        return
    head = path.read_text(encoding="utf-8").split(MEASURED)[0]
    body = [MEASURED, "", "Change against the base (paired 95% interval):", "", *[f"- {line}" for line in lines], "",
            f"Full report: {report_path}", ""]
    artifacts.write_text(path, head + "\n".join(body))
