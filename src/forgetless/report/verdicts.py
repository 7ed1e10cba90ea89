"""The report's opening: verdicts from the same-dose and matched-gain statistics, and the per-item records they
are computed from.

A result directory holds ``items.jsonl.gz`` (one row per model, draw, measure and item: the input of
:func:`forgetless.core.verdicts.records_from_rows`) and ``verdicts.json`` (the config, the measures and every
number of the tables), so ``benchmarks/rederive.py RESULT_DIR`` recomputes the tables from the items alone.

Rows of ``items.jsonl.gz``::

    {"model": "sft@lr0.0003", "recipe": "sft", "dose": "lr0.0003", "alpha": 1.0, "draw": 0,
     "measure": "gen:gsm8k", "item": "gsm8k/17", "score": 0.83}

The base is ``{"model": "base", "recipe": "base", "dose": null, "draw": 0}``; a WiSE-FT model carries its
recipe's dose and its ``alpha``; a pooled record's per-seed scores (``seeds`` of its items) become draws.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from forgetless.core.matched import matched_gain
from forgetless.core.sentences import interval_text, n_text, verdict_sentence
from forgetless.core.verdicts import BASE, Measure, VerdictConfig, p_text, records_from_rows, same_dose
from forgetless.lm import artifacts
from forgetless.retention.records import list_tasks, read_task

ITEMS_FILE = "items.jsonl.gz"
VERDICTS_FILE = "verdicts.json"
VERDICTS_MD = "verdicts.md"
SOURCES = {"gsm8k": "GSM8K", "mbpp": "MBPP", "mbpp-validation": "MBPP validation", "mbpp-test": "MBPP test",
           "ifeval": "IFEval", "arc_challenge": "ARC-Challenge", "math": "MATH"}
# metric -> why it favours a kind of recipe by construction (such a measure never headlines)
ONE_SIDED = {"working_kept": "a length measure: it counts the working an answer keeps, so longer answers score more",
             "skips_working": "a length measure: it counts answers without working",
             "surprise": "leans toward recipes that sharpen the base's own choices (STM)",
             "kept": "favours STM by construction (STM trains exactly the kept kind of token)",
             "masked": "favours ground truth by construction", "all": "favours ground truth by construction",
             "format": "a format detail: a bare '#### 12' complies", "kl_base_tuned": "charges sharpening toward the "
             "base's own top choice, which STM does most"}
METRICS = {"working_kept": "working kept", "skips_working": "skips the working", "format": "format followed",
           "surprise": "surprise to the base", "defines": "defines the function", "kept": "held-out NLL, kept tokens",
           "masked": "held-out NLL, masked tokens", "all": "held-out NLL, all tokens", "kl_base_tuned": "KL drift",
           "did_what_asked": "did what was asked", "prompt_level_strict_acc": "prompt-level strict accuracy",
           "prompt_level_loose_acc": "prompt-level loose accuracy", "inst_level_strict_acc": "instruction-level strict "
           "accuracy", "inst_level_loose_acc": "instruction-level loose accuracy", "asserts": "asserts passed"}


def plain_name(task: str, metric: str | None = None) -> str:
    """``gen:mbpp-validation:defines`` -> 'MBPP validation: defines the function'; unknown names stay as they are."""
    parts = task.split(":")
    if parts[0] in ("gen", "heldout", "drift") and len(parts) >= 2:
        source = source_name(parts[1])
        what = parts[2] if len(parts) > 2 else ("kl_base_tuned" if parts[0] == "drift" else metric or "score")
        return f"{source}: {METRICS.get(what, what.replace('_', ' '))}"
    return SOURCES.get(task, task)


def source_name(source: str) -> str:
    """A prompt source's plain name ('IFEval'); one given as a file path, by its last two parts
    (``runs/mine/holdout/target.jsonl`` -> 'holdout/target.jsonl'): the tables have no room for the whole path, which
    the run's config holds."""
    if source in SOURCES:
        return SOURCES[source]
    return "/".join(Path(source).parts[-2:]) if "/" in source else source


def measure_of(task: str, record: dict, target: str, sources: Mapping[str, str] = MappingProxyType({}),
               floor_margin: float | None = None) -> Measure:
    """The :class:`Measure` of a retention record (the base's): the target, a measure that does not headline (with
    why), or a headline one.

    One headline per prompt source: ``gen:<source>:<metric>`` is another reading of the same prompts when
    ``gen:<source>`` is among ``sources`` (source task -> the plain name of its headline measure): IFEval's loose
    and instruction-level accuracies beside prompt-level strict, GSM8K's accuracy beside did-what-was-asked. It is
    shown but is not a test of its own. A higher-is-better measure on which the base scores at most ``floor_margin``
    (the equivalence margin) cannot show a loss beyond the margin, so "equivalent" would be true by construction: it
    does not headline either.
    """
    metric = task.split(":")[2] if task.count(":") >= 2 else record.get("metric", "")
    higher = bool(record.get("higher_is_better", True))
    if task == target:
        return Measure(task, plain_name(task, "pass rate") + " (target)", "target", higher)
    lean = ONE_SIDED.get(metric) or (ONE_SIDED["kl_base_tuned"] if task.startswith("drift:") else None)
    if lean is None and target.startswith("gen:") and task.startswith(target + ":"):
        lean = "a detail of the target task"
    parent = ":".join(task.split(":")[:2])
    if lean is None and task.count(":") >= 2 and parent in sources:
        lean = f"another reading of the prompts of {source_name(parent.split(':')[1])}, whose headline is " \
               f"{sources[parent]}"
    score = record.get("score")
    if lean is None and floor_margin is not None and higher and score is not None and score <= floor_margin:
        lean = (f"the base scores {score:.3f}, within the equivalence margin ({floor_margin:g}) of 0: no loss beyond "
                "the margin can show")
    return Measure(task, plain_name(task, metric), "retention", higher, lean)


def model_tasks(d: Path, eval_dir, target: str | None) -> dict[str, Path]:
    """Task -> the directory holding its records, for one model: its retention records, and the target from its eval
    records (``eval_dir``) when retention does not hold it, as for a run's held-out share of the user's data."""
    where = dict.fromkeys(list_tasks(d), d)
    if target and target not in where and eval_dir and target in list_tasks(eval_dir):
        where[target] = Path(eval_dir)
    return where


def grid_rows(grid: list[dict], base_dir: Path, base_eval_dir: Path | None = None,
              target: str | None = None) -> list[dict]:
    """Flat item rows of the base and of every grid point with a retention directory (module docstring); a point's
    ``eval_dir`` (and ``base_eval_dir``) supply the ``target`` where the retention records lack it."""
    points = [{"label": "base", "method": BASE, "lr": None, "alpha": None, "retention_dir": base_dir,
               "eval_dir": base_eval_dir}] + list(grid)
    dose = {g["label"]: f"lr{g['lr']:g}" for g in grid if g.get("lr")}
    method = {g["label"]: g["method"] for g in grid if g.get("alpha") is None}
    rows, seen = [], set()
    for g in points:
        d = Path(g["retention_dir"]) if g.get("retention_dir") else None
        if d is None or not d.is_dir() or d.resolve() in seen:
            continue  # a WiSE-FT curve's alpha 1 is its trained model, read once
        seen.add(d.resolve())
        label, alpha = g["label"], g.get("alpha")
        trained = label.split("@a")[0]
        # a WiSE-FT model (the trained adapter scaled by alpha) is a point of its trained recipe's own curve
        head = {"model": label, "recipe": method.get(trained, g["method"]),
                "dose": dose.get(label) or dose.get(trained), "alpha": 1.0 if alpha is None else float(alpha)}
        for task, where in model_tasks(d, g.get("eval_dir"), target).items():
            for item_id, item in read_task(where, task)[1].items():
                scores = item.get("seeds") or [item["score"]]
                rows += [{**head, "draw": k, "measure": task, "item": item_id, "score": s}
                         for k, s in enumerate(scores) if s is not None and not math.isnan(s)]
    return rows


def grid_measures(base_dir: Path, target: str, floor_margin: float | None = None,
                  base_eval_dir: Path | None = None) -> list[Measure]:
    """The measures of the base's records (:func:`measure_of`), the target first (read from ``base_eval_dir`` where
    the retention records lack it)."""
    where = model_tasks(base_dir, base_eval_dir, target)
    tasks = sorted(where, key=lambda t: t != target)
    records = {t: read_task(where[t], t)[0] for t in tasks}
    sources = {t: plain_name(t, records[t].get("metric")) for t in tasks if t.count(":") == 1}
    return [measure_of(t, records[t], target, sources, floor_margin) for t in tasks]


def build_verdicts(rows: list[dict], measures: list[Measure], cfg: VerdictConfig) -> dict:
    """Everything the verdict block and the detail tables print (JSON-able)."""
    records = records_from_rows(rows, measures)
    dose = same_dose(records, cfg)
    matched = matched_gain(records, cfg) if any(m.recipe == BASE for m in records.models.values()) else []
    reference = cfg.reference or records.recipes()[0]
    return {"config": vars(cfg) | {"reference": reference}, "measures": [vars(m) | {} for m in measures],
            "reference": reference, "same_dose": dose, "matched_gain": matched}


def family_text(rows: list[dict], data: dict) -> str:
    names = sorted({_plain(data, r["measure"]) for r in rows})
    rivals = sorted({r["rival"] for r in rows})
    return (f"{len(rows)} tests: {data['reference']} against {', '.join(rivals)} on {', '.join(names)}"
            if rows else "no tests")


def _plain(data: dict, measure: str) -> str:
    return next((m["plain"] for m in data["measures"] if m["name"] == measure), measure)


def render_verdicts(data: dict) -> str:
    """The verdict block: one line per rival and headline measure, same dose first, then matched gain."""
    cfg = data["config"]
    head = [r for r in data["same_dose"] if r["headline"]]
    lines = ["# Verdicts", "",
             f"Each recipe against **{data['reference']}** at the same learning rate, steps, adapter and training data "
             "(reference − rival; 95% percentile intervals of one joint bootstrap over items and training draws, "
             f"{cfg['n_boot']} replicates, seed {cfg['seed']}). A win needs the retention difference resolved after "
             f"Holm's correction at α = {cfg['alpha']:g} *and* the target non-inferior (its lower bound above "
             f"−{cfg['target_margin']:g}); 'equivalent' needs both one-sided tests within "
             f"±{cfg['equivalence_margin']:g} (TOST, Holm-adjusted); anything else is not resolved.", "",
             f"Holm family: {family_text(head, data)}.", ""]
    lines += [f"- {verdict_sentence(r, _plain(data, r['measure']), len(head))}" for r in head] or \
        ["- No retention measure here can headline (each one leans toward a kind of recipe): see the details."]
    matched = data["matched_gain"]
    if matched:
        lines += ["", f"Secondary, at matched target gain g* = {cfg['matched_gain']:g} (fixed before the run; each "
                  "recipe's curve is the upper concave hull of its measured models and the base, rebuilt in every "
                  f"replicate). Holm family: {family_text(matched, data)}.", ""]
        lines += [f"- {verdict_sentence(r, _plain(data, r['measure']), len(matched))}" for r in matched]
    return "\n".join(lines) + "\n"


def render_details(data: dict) -> str:
    """The detail tables under plain names: every measure at the same dose, and the matched-gain reach."""
    lines = ["## Same-dose differences on every measure", "",
             "| rival | dose | measure | reference − rival [95%] | n | p | Holm p | verdict |", "|" + "---|" * 8]
    for r in data["same_dose"]:
        m = next(x for x in data["measures"] if x["name"] == r["measure"])
        tag = r.get("verdict") or ("target (checked for non-inferiority)" if m["role"] == "target" else
                                   f"does not headline: {m['one_sided']}")
        b = data["config"]["n_boot"]
        holm_p = p_text(r["p_holm"], b) if "p_holm" in r else "—"
        lines.append(f"| {r['rival']} | {r['dose']} | {m['plain']} | {interval_text(r)} | {n_text(r)[4:]} "
                     f"| {p_text(r['p'], b)} | {holm_p} | {tag} |")
    if data["matched_gain"]:
        lines += ["", f"## At matched gain {data['config']['matched_gain']:g}", "",
                  "| rival | measure | reference − rival [95%] | n | share of replicates reaching g*: reference, "
                  "rival, both | verdict |", "|" + "---|" * 6]
        for r in data["matched_gain"]:
            lines.append(f"| {r['rival']} | {_plain(data, r['measure'])} | {interval_text(r)} | {n_text(r)[4:]} "
                         f"| {r['reached_reference']:.2f}, {r['reached_rival']:.2f}, {r['reached_both']:.2f} "
                         f"| {r['verdict']} |")
    return "\n".join(lines) + "\n"


def write_items(path: Path, rows: list[dict]) -> Path:
    """``items.jsonl.gz`` in the rows' order (the models' order is the report's: the first recipe is the default
    reference), gzip mtime 0 so that the same rows give the same bytes."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)

    def write(tmp):
        # The gzip header names the file: the name it has always held, not the random temporary one.
        with open(tmp, "wb") as raw, gzip.GzipFile(f".tmp-{path.name}", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(text.encode("utf-8"))

    artifacts.write_atomic(path, write)
    return path


def read_items(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_verdicts(out: Path, rows: list[dict], measures: list[Measure], cfg: VerdictConfig) -> dict:
    """items.jsonl.gz, verdicts.json and verdicts.md (verdict block, then details) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    data = build_verdicts(rows, measures, cfg)
    write_items(out / ITEMS_FILE, rows)
    artifacts.write_text(out / VERDICTS_FILE, json.dumps(data, indent=1, default=_json) + "\n")
    artifacts.write_text(out / VERDICTS_MD, render_verdicts(data) + "\n" + render_details(data))
    return data


def _json(x):
    return float(x) if hasattr(x, "__float__") else str(x)


def verdict_section(out: Path, grid: list[dict], base_dir: Path, target: str,
                    settings: VerdictConfig | dict | None = None, base_eval_dir: Path | None = None) -> str:
    """report.md's opening for a frontier grid: the verdict block, the frontier plot, the detail tables; the records
    and numbers behind them written to ``out`` (:func:`write_verdicts`). Empty when the base has no target record
    (in its retention records, or in ``base_eval_dir``). ``settings``: a VerdictConfig, or some of its fields."""
    if not base_dir.is_dir() or target not in model_tasks(base_dir, base_eval_dir, target):
        return ""
    cfg = settings if isinstance(settings, VerdictConfig) else VerdictConfig(**(settings or {}))
    rows = grid_rows(grid, base_dir, base_eval_dir, target)
    measures = grid_measures(base_dir, target, cfg.equivalence_margin, base_eval_dir)
    if len({r["recipe"] for r in rows} - {BASE}) < 2:
        return ""
    data = write_verdicts(out, rows, measures, cfg)
    return render_verdicts(data) + "\n![frontier](frontier.png)\n\n" + render_details(data) + "\n"
