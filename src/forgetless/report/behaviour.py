"""The behaviour section of the report: what each tuned model does on the prompt sets, against
the base and against the other methods, paired on the same prompts.

Against the base: the share of the base's working kept, the share of answers that skip the
working, format compliance, accuracy (flagged where the base sits at its floor) and the
surprise of the tuned answers to the base, each with its 95% interval. Between methods: the
paired bootstrap difference of working kept, and the discordant prompts of "skips the working"
with an exact McNemar p-value, so "STM keeps the working" can be told from "STM trained fewer
tokens" (the same-count random mask) item by item.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

from forgetless.core.intervals import mcnemar_exact, paired_difference
from forgetless.report.cells import MISSING, cell
from forgetless.retention.records import read_task

LEANS = {
    "gen:": "neutral: no recipe trains on these prompts or tests",
    "heldout:*:kept": "favours STM by construction (STM trains exactly the kept kind of token)",
    "heldout:*:masked": "favours ground truth by construction (only ground truth trains the masked kind)",
    "heldout:*:all": "favours ground truth by construction (it trains on every gold token)",
    "drift:": "KL(base‖tuned) also charges sharpening toward the base's own top choice, which STM does most",
    "surprise": "leans toward methods that sharpen the base's own choices, as STM does (it trains only tokens the base "
                "already finds likely)",
    "mc": "neutral: fixed continuations no recipe trains on; misses behaviour (what the model writes)",
    "task": "neutral: task success on items no recipe trains on",
}

_cell = functools.partial(cell, digits=2)  # the behaviour tables' cells: 2 digits unless a call says


def lean(task: str, recipe_sources: tuple[str, ...] = ()) -> str:
    """Which way a measure leans, for the report's notes; ``recipe_sources`` (``label=source``: the prompt source a
    recipe trains on) adds, for a measure drawn from such a source, that it favours that recipe."""
    from forgetless.retention.olmo_tasks import VARIANTS

    from forgetless.report.verdicts import ONE_SIDED  # the one table of measures that lean by construction

    metric = task.rsplit(":", 1)[-1] if task.count(":") >= 2 else ""
    if task.startswith("heldout:"):
        text = LEANS[f"heldout:*:{task.rsplit(':', 1)[-1]}"]
    elif task.startswith("gen:") and metric in ONE_SIDED and metric != "surprise":
        text = f"one-sided, never the headline: {ONE_SIDED[metric]}"
    elif task.endswith(":surprise"):
        text = LEANS["surprise"]
    elif task.startswith(("gen:", "drift:")):
        text = LEANS[task[: task.index(":") + 1]]
    else:
        text = LEANS["mc"] if task.split(":")[0] in VARIANTS else LEANS["task"]
    favoured = recipe_leans(task, recipe_sources)
    if favoured:
        text = text.removeprefix("neutral: ") if text.startswith("neutral") else text
        return "; ".join(favoured) + f" (otherwise: {text})"
    return text


def source_family(source: str) -> str:
    """A prompt source without its split: ``mbpp-validation`` -> ``mbpp``, ``math-test`` -> ``math``.

    >>> source_family("mbpp-validation"), source_family("arc_challenge-test"), source_family("gsm8k")
    ('mbpp', 'arc_challenge', 'gsm8k')
    """
    name = Path(source).stem.removesuffix(".jsonl") if "/" in source else source
    for split in ("-train", "-validation", "-test-plus", "-test", "-paper"):
        name = name.removesuffix(split)
    return name


def measured_source(task: str) -> str | None:
    """The prompt source a record is drawn from (``gen:``, ``drift:``, ``heldout:``), or the task itself."""
    head, _, rest = task.partition(":")
    return rest.split(":")[0] if head in ("gen", "drift", "heldout") else head


def recipe_leans(task: str, recipe_sources: tuple[str, ...]) -> list[str]:
    """``favours <recipe>`` for each recipe that trains on prompts of the source ``task`` is drawn from."""
    out = []
    for entry in recipe_sources:
        label, _, source = entry.partition("=")
        if source_family(source) == source_family(measured_source(task) or ""):
            out.append(f"favours {label} (it trains on {source}'s prompts, the source of this measure)")
    return out


def sources(summaries: dict[str, dict]) -> list[str]:
    """The prompt sets with behaviour records, in the order first seen."""
    found = {}
    for s in summaries.values():
        for task in s.get("behaviour", {}):
            found.setdefault(task.split(":")[1], None)
    return list(found)


def budget_line(summaries: dict[str, dict], source: str) -> str:
    """The token budget of a source's answers and the share of them the base finished within it."""
    first = next(iter(summaries.values()))["behaviour"].get(f"gen:{source}") or {}
    rate, budget = first.get("base_finish_rate"), first.get("max_new_tokens")
    if rate is None or budget is None:
        return ""
    short = (" — under 90%: the budget cuts the base, so a measure that needs a finished answer reads low"
             if rate < 0.9 else "")
    return f"Budget {budget} new tokens; the base finished {rate:.0%} of its answers within it{short}."


def against_base_table(summaries: dict[str, dict], source: str) -> list[str]:
    b = lambda s, m: s["behaviour"].get(f"gen:{source}" + (f":{m}" if m else ""))  # noqa: E731
    first = next(iter(summaries.values()))
    if b(first, None) and b(first, None)["metric"] == "prompt_level_strict_acc":
        return _ifeval_table(summaries, b)
    if b(first, None) and b(first, None)["metric"] == "asserts":
        head = ["method", "asserts passed (tuned)", "Δ asserts vs base", "defines the function", "pass@1",
                "Δ surprise (nats/token)"]
        rows = []
        for name, s in summaries.items():
            a, d, p, sur = b(s, None), b(s, "defines"), b(s, "pass@1"), b(s, "surprise")
            rows.append([name, _cell(a["tuned"], a["tuned_ci95"]), _cell(a["score"], a["ci95"], signed=True),
                         _cell(d and d["tuned"]), _cell(p and p["tuned"]),
                         _cell(sur and sur["score"], sur and sur["ci95"], signed=True)])
        base_row = ["base", _cell(a["base"]), "0", _cell(d and d["base"]), _cell(p and p["base"]), "0"]
    else:
        asked = b(first, None) and b(first, None)["metric"] == "did_what_asked"
        head = ["method", *(["did what was asked (tuned / base)", "Δ did what was asked"] if asked else []),
                "working kept", "skips the working (tuned / base)", "format (tuned / base)",
                "accuracy (tuned / base)", "Δ surprise (nats/token)"]
        rows = []
        for name, s in summaries.items():
            k, sk, f, acc, sur = (b(s, m) for m in ("working_kept" if asked else None, "skips_working", "format",
                                                     "accuracy", "surprise"))
            floor = " (base at floor)" if acc and acc.get("base_above_floor") is False else ""
            a = b(s, None)
            did = [f"{_cell(a['tuned'])} / {_cell(a['base'])}",
                   _cell(a["score"], a["ci95"], signed=True)] if asked else []
            rows.append([name, *did, _cell(k and k["tuned"], k and k["tuned_ci95"]),
                         f"{_cell(sk and sk['tuned'])} / {_cell(sk and sk['base'])}",
                         f"{_cell(f and f['tuned'])} / {_cell(f and f['base'])}",
                         f"{_cell(acc and acc['tuned'])} / {_cell(acc and acc['base'])}{floor}",
                         _cell(sur and sur["score"], sur and sur["ci95"], signed=True)])
        base_row = None
    return _table(head, base_row, rows)


def _table(head: list[str], base_row: list[str] | None, rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base_row:
        lines.append("| " + " | ".join(base_row) + " |")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _ifeval_table(summaries: dict[str, dict], b) -> list[str]:
    """IFEval against the base: the four lm-eval metrics (tuned / base) and the paired change of the prompt-level
    strict accuracy (per prompt) and instruction-level strict accuracy (per instruction)."""
    head = ["method", "prompt-level strict (tuned / base)", "Δ prompt-level strict",
            "prompt-level loose (tuned / base)",
            "inst-level strict (tuned / base)", "Δ inst-level strict", "inst-level loose (tuned / base)"]
    rows = []
    for name, s in summaries.items():
        ps, pl, ins, il = (b(s, m)
                           for m in (None, "prompt_level_loose_acc", "inst_level_strict_acc", "inst_level_loose_acc"))
        pair = lambda r: f"{_cell(r and r['tuned'], digits=3)} / {_cell(r and r['base'], digits=3)}"  # noqa: E731
        rows.append([name, pair(ps), _cell(ps["score"], ps["ci95"], digits=3, signed=True), pair(pl), pair(ins),
                     _cell(ins and ins["score"], ins and ins["ci95"], digits=3, signed=True), pair(il)])
    return _table(head, None, rows)


def between_methods(run_dirs: dict[str, Path], source: str, labels: list[str]) -> list[str]:
    """Each pair of methods on the same prompts: the primary measure (paired bootstrap of a − b)
    and the discordant prompts of a yes/no measure (exact McNemar): skipping the working on a
    non-target set, passing every test on a target set."""
    primary = read_task(run_dirs[labels[0]], f"gen:{source}")[0]["metric"]
    binary = {"asserts": "pass@1", "working_kept": "skips_working"}.get(primary)  # else the primary is yes/no itself
    lines = [f"| a vs b | {primary.replace('_', ' ')}, a − b [95%] | prompts where only a / only b "
             f"{(binary or primary).replace('_', ' ')} | exact McNemar p |", "|---|---|---|---|"]
    for a, b in itertools.combinations(labels, 2):
        try:
            ka, kb = (read_task(run_dirs[x], f"gen:{source}")[1] for x in (a, b))
            sa, sb = (read_task(run_dirs[x], f"gen:{source}" + (f":{binary}" if binary else ""))[1] for x in (a, b))
        except FileNotFoundError:
            continue
        d = paired_difference({i: v["score"] for i, v in ka.items()}, {i: v["score"] for i, v in kb.items()})
        ids = sorted(set(sa) & set(sb))
        only_a = sum(1 for i in ids if sa[i]["score"] > sb[i]["score"])
        only_b = sum(1 for i in ids if sb[i]["score"] > sa[i]["score"])
        diff = _cell(d["mean"], d["ci95"], signed=True) if d["n"] else MISSING
        lines.append(f"| {a} vs {b} | {diff} (n={d['n']}) | {only_a} / {only_b} "
                     f"| {mcnemar_exact(only_a, only_b):.3g} |")
    return lines


# The behaviour section's explanation, a sentence per measure, each shown only where its source was measured.
GSM8K_NOTE = ("Did what was asked (GSM8K, the headline): at least 40 characters of working and a final "
              "`#### <number>`. Working kept: the share of the base's working (characters before the final-answer "
              "marker, e.g. GSM8K's `####`) left in the tuned answer, on prompts where the base wrote at least a "
              "sentence (1 = all of it); it counts length, is one-sided and favours answers that never finish, so it "
              "is a secondary measure.")
IFEVAL_NOTE = "IFEval: lm-eval's four metrics, each instruction checked by deterministic code."
SURPRISE_NOTE = ("Surprise: mean NLL per token of the tuned model's answer under the base (Δ against the base's own "
                 "answer); it sees a changed opening in full, where teacher-forced drift dilutes it.")
ASSERTS_NOTE = "Asserts passed: the share of each target item's tests its code passes, run in the sandbox."
LEANS_NOTE = ("Which recipe a measure favours (one that trains on its prompt source) is in the report's list of leans. "
              "Brackets: 95% intervals, paired on the same prompts. Under each table: the token budget and the share "
              "of answers the base finished within it.")


def behaviour_markdown(summaries: dict[str, dict], run_dirs: dict[str, Path]) -> str:
    """The report section (empty when no run has behaviour records)."""
    found = sources(summaries)
    if not found:
        return ""
    lines = ["", "## Behaviour: what each model writes, greedy, on the same prompts as the base", "",
             " ".join(text for shown, text in (
                 ("gsm8k" in found, GSM8K_NOTE), ("ifeval" in found, IFEVAL_NOTE), (True, SURPRISE_NOTE),
                 (any(s.startswith("mbpp") for s in found), ASSERTS_NOTE), (True, LEANS_NOTE)) if shown)]
    labels = [k for k in summaries]
    for source in found:
        lines += ["", f"### {source}", ""] + against_base_table(summaries, source)
        budget = budget_line(summaries, source)
        lines += ["", budget] if budget else []
        pairs = between_methods(run_dirs, source, labels) if len(labels) > 1 else []
        if len(pairs) > 2:
            lines += ["", "Between methods, same prompts:", ""] + pairs
    return "\n".join(lines) + "\n"
