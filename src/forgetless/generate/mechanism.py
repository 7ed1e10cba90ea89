"""Why STM works, in numbers: how perplexed the base model is by each kind of training answer.

For the same prompts, the response tokens of the ground truth, of Self-Output and of Rephrase
answers are scored under the base model. The paper's observation: ground-truth answers spike
(per-example ppl 6-8 on its models) while the model's own answers rarely exceed ppl 2, so
training on them moves the model far less. :func:`ppl_summary` is the pure core; the caller
gives it each example's response-token NLLs (as :func:`forgetless.core.tokenstats.scored_response_nll`
returns them).
"""

from __future__ import annotations

import numpy as np

from forgetless.core.masking import above_tau
from forgetless.core.tokenstats import TAU_SWEEP

EXAMPLE_PPL_LINE = 2.0  # "Self-Output rarely above 2": the share of examples over this ppl


def ppl_summary(per_example_nll: list[np.ndarray], taus=TAU_SWEEP) -> dict:
    """Perplexity statistics of a set of answers, from each answer's response-token NLLs (nats).

    An example's ppl is ``exp(mean NLL of its tokens)``; ``fraction_above[tau]`` is the share of
    all response tokens with token ppl > tau (what STM at that tau would mask). Examples without
    tokens are skipped.
    """
    per_example = [np.asarray(e, dtype=np.float64) for e in per_example_nll if len(e)]
    if not per_example:
        return {"examples": 0, "response_tokens": 0}
    flat = np.concatenate(per_example)
    example_ppl = np.exp(np.array([e.mean() for e in per_example]))
    return {
        "examples": len(per_example),
        "response_tokens": int(flat.size),
        "mean_nll": float(flat.mean()),
        "corpus_ppl": float(np.exp(flat.mean())),
        "mean_example_ppl": float(example_ppl.mean()),
        "median_example_ppl": float(np.median(example_ppl)),
        "max_example_ppl": float(example_ppl.max()),
        f"fraction_examples_ppl_above_{EXAMPLE_PPL_LINE:g}": float(np.mean(example_ppl > EXAMPLE_PPL_LINE)),
        "fraction_tokens_above": {str(t): float(np.mean(above_tau(flat, t))) for t in taus},
    }


def compare_sets(sets: dict[str, dict[str, np.ndarray]], generated: dict[str, set[str]],
                 samples: dict[str, list[np.ndarray]] | None = None, taus=TAU_SWEEP) -> dict:
    """Side-by-side summaries of answer sets, each ``{example id: response-token NLLs}``.

    ``all``: every set on the prompts all of them have. ``generated``: only prompts where every
    set named in ``generated`` has a model-written (not fallback) answer, so fallbacks to the
    ground truth do not blur the comparison. ``all_samples``: every sampled answer, verified or
    not, beside the ground truth.
    """
    common = set.intersection(*(set(s) for s in sets.values())) if sets else set()
    both = set.intersection(common, *generated.values()) if generated else common
    views = {
        "all": {name: ppl_summary([s[i] for i in sorted(common)], taus) for name, s in sets.items()},
        "generated": {name: ppl_summary([s[i] for i in sorted(both)], taus) for name, s in sets.items()},
    }
    if samples:
        views["all_samples"] = {name: ppl_summary(v, taus) for name, v in samples.items()}
    return {"prompts": {"all": len(common), "generated": len(both)}, "views": views}


def format_table(stats: dict) -> str:
    """A plain-text table of :func:`compare_sets` output, one block per view."""
    lines = []
    for view, rows in stats["views"].items():
        taus = next((list(r["fraction_tokens_above"]) for r in rows.values() if r.get("examples")), [])
        header = f"{'set':<30}{'n':>5}{'tokens':>8}{'ppl mean':>10}{'median':>8}{'max':>9}{'>2':>6}"
        header += "".join(f"{'τ' + t:>8}" for t in taus)
        lines += [f"[{view}] mean/median/max per-example ppl; '>2': share of examples above ppl 2; "
                  "τ columns: share of response tokens with ppl > τ", header]
        for name, r in rows.items():
            if not r.get("examples"):
                lines.append(f"{name:<30}{0:>5}")
                continue
            row = (f"{name:<30}{r['examples']:>5}{r['response_tokens']:>8}{r['mean_example_ppl']:>10.2f}"
                   f"{r['median_example_ppl']:>8.2f}{r['max_example_ppl']:>9.2f}"
                   f"{r[f'fraction_examples_ppl_above_{EXAMPLE_PPL_LINE:g}']:>6.2f}")
            lines.append(row + "".join(f"{r['fraction_tokens_above'][t]:>8.3f}" for t in taus))
        lines.append("")
    return "\n".join(lines)
