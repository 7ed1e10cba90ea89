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

import itertools
import math
from pathlib import Path

from forgetless.core.intervals import mcnemar_exact, paired_difference
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


def lean(task: str) -> str:
    """Which way a measure leans, for the report's notes."""
    from forgetless.retention.olmo_tasks import VARIANTS

    if task.startswith("heldout:"):
        return LEANS[f"heldout:*:{task.rsplit(':', 1)[-1]}"]
    if task.endswith(":surprise"):
        return LEANS["surprise"]
    for prefix in ("gen:", "drift:"):
        if task.startswith(prefix):
            return LEANS[prefix]
    return LEANS["mc"] if task.split(":")[0] in VARIANTS else LEANS["task"]


def _cell(x: float | None, ci=None, digits: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if ci and not any(c is None or math.isnan(c) for c in ci):
        return f"{f.format(x)} [{f.format(ci[0])}, {f.format(ci[1])}]"
    return f.format(x)


def sources(summaries: dict[str, dict]) -> list[str]:
    """The prompt sets with behaviour records, in the order first seen."""
    found = {}
    for s in summaries.values():
        for task in s.get("behaviour", {}):
            found.setdefault(task.split(":")[1], None)
    return list(found)


def against_base_table(summaries: dict[str, dict], source: str) -> list[str]:
    b = lambda s, m: s["behaviour"].get(f"gen:{source}" + (f":{m}" if m else ""))  # noqa: E731
    first = next(iter(summaries.values()))
    if b(first, None) and b(first, None)["metric"] == "asserts":
        head = ["method", "asserts passed (tuned)", "Δ asserts vs base", "defines the function", "pass@1", "Δ surprise (nats/token)"]
        rows = []
        for name, s in summaries.items():
            a, d, p, sur = b(s, None), b(s, "defines"), b(s, "pass@1"), b(s, "surprise")
            rows.append([name, _cell(a["tuned"], a["tuned_ci95"]), _cell(a["score"], a["ci95"], signed=True),
                         _cell(d and d["tuned"]), _cell(p and p["tuned"]), _cell(sur and sur["score"], sur and sur["ci95"], signed=True)])
        base_row = ["base", _cell(a["base"]), "0", _cell(d and d["base"]), _cell(p and p["base"]), "0"]
    else:
        head = ["method", "working kept", "skips the working (tuned / base)", "format (tuned / base)",
                "accuracy (tuned / base)", "Δ surprise (nats/token)"]
        rows = []
        for name, s in summaries.items():
            k, sk, f, acc, sur = (b(s, m) for m in (None, "skips_working", "format", "accuracy", "surprise"))
            floor = " (base at floor)" if acc and acc.get("base_above_floor") is False else ""
            rows.append([name, _cell(k and k["tuned"], k and k["tuned_ci95"]),
                         f"{_cell(sk and sk['tuned'])} / {_cell(sk and sk['base'])}",
                         f"{_cell(f and f['tuned'])} / {_cell(f and f['base'])}",
                         f"{_cell(acc and acc['tuned'])} / {_cell(acc and acc['base'])}{floor}",
                         _cell(sur and sur["score"], sur and sur["ci95"], signed=True)])
        base_row = None
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base_row:
        lines.append("| " + " | ".join(base_row) + " |")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def between_methods(run_dirs: dict[str, Path], source: str, labels: list[str]) -> list[str]:
    """Each pair of methods on the same prompts: the primary measure (paired bootstrap of a − b)
    and the discordant prompts of a yes/no measure (exact McNemar): skipping the working on a
    non-target set, passing every test on a target set."""
    primary = read_task(run_dirs[labels[0]], f"gen:{source}")[0]["metric"]
    binary = "pass@1" if primary == "asserts" else "skips_working"
    lines = [f"| a vs b | {primary.replace('_', ' ')}, a − b [95%] | prompts where only a / only b {binary.replace('_', ' ')} "
             "| exact McNemar p |", "|---|---|---|---|"]
    for a, b in itertools.combinations(labels, 2):
        try:
            ka, kb = (read_task(run_dirs[x], f"gen:{source}")[1] for x in (a, b))
            sa, sb = (read_task(run_dirs[x], f"gen:{source}:{binary}")[1] for x in (a, b))
        except FileNotFoundError:
            continue
        d = paired_difference({i: v["score"] for i, v in ka.items()}, {i: v["score"] for i, v in kb.items()})
        ids = sorted(set(sa) & set(sb))
        only_a = sum(1 for i in ids if sa[i]["score"] > sb[i]["score"])
        only_b = sum(1 for i in ids if sb[i]["score"] > sa[i]["score"])
        diff = _cell(d["mean"], d["ci95"], signed=True) if d["n"] else "—"
        lines.append(f"| {a} vs {b} | {diff} (n={d['n']}) | {only_a} / {only_b} | {mcnemar_exact(only_a, only_b):.3g} |")
    return lines


def behaviour_markdown(summaries: dict[str, dict], run_dirs: dict[str, Path]) -> str:
    """The report section (empty when no run has behaviour records)."""
    found = sources(summaries)
    if not found:
        return ""
    lines = ["", "## Behaviour: what each model writes, greedy, on the same prompts as the base", "",
             "Working kept: the share of the base's working (characters before the final-answer marker, e.g. GSM8K's "
             "`####`) left in the tuned answer, on prompts where the base wrote at least a sentence (1 = all of it). "
             "Surprise: mean NLL per token of the tuned model's answer under the base (Δ against the base's own answer); "
             "it sees a changed opening in full, where teacher-forced drift dilutes it. Asserts passed: the share of each "
             "target item's tests its code passes, run in the sandbox. All of these lean toward no method: no recipe "
             "trains on these prompts or tests. Brackets: 95% intervals, paired on the same prompts."]
    labels = [k for k in summaries]
    for source in found:
        lines += ["", f"### {source}", ""] + against_base_table(summaries, source)
        pairs = between_methods(run_dirs, source, labels) if len(labels) > 1 else []
        if len(pairs) > 2:
            lines += ["", "Between methods, same prompts:", ""] + pairs
    return "\n".join(lines) + "\n"
