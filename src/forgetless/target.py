"""The target of a ``forgetless run`` on a user's own data: a seeded held-out share of that data, and the checks that
keep a run on your data from being reported on another task.

* ``data`` that is not a bundled split and no ``target``: :func:`split_holdout` keeps a seeded share of the examples
  out of training (``<out_dir>/holdout/target.jsonl``) and trains on the rest (``train.jsonl``). The target measure
  is a task file (``task.yaml``, read by :mod:`forgetless.eval.tasks.custom`): the model's greedy answer to each
  held-out prompt scored against the reference answer by chrF (sacrebleu's character n-gram F-score, 0-1), which
  rewards the content of the answer whichever recipe trained it. The held-out NLL of all tokens and of the kept
  kind stands beside it, each with the way it leans (:mod:`forgetless.retention.heldout`).
* A ``target`` that names another data set than ``data`` is refused (:func:`check_target`) unless
  ``other_target`` says it is meant.
* :func:`tau_share_note`: one line when τ masks outside 10-40% of the training responses (the paper: 20-24%).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from forgetless.config import ConfigError
from forgetless.core.masking import tau_for_fraction
from forgetless.lm import artifacts
from forgetless.lm.data import bundled_names, load_examples

HOLDOUT = "holdout"  # the target task's name, and the run's subdirectory for the split
MIN_HELDOUT = 4
USUAL_SHARE = (0.10, 0.40)  # masked shares of the response tokens a τ is expected to give
PAPER_SHARE = "20-24%"


def own_data(data: str) -> bool:
    """True for a user's data set (a file, a saved dataset, ``hf:``), False for a split bundled with forgetless."""
    return data not in bundled_names()


def data_family(data: str) -> str | None:
    """The task a bundled split belongs to (``mbpp-train`` -> ``mbpp``); None for a user's data."""
    return None if own_data(data) else data.rsplit("-", 1)[0] if "-" in data else data


def target_family(target: str) -> str | None:
    """The data set a target measures: ``gen:mbpp-validation`` / ``heldout:mbpp-validation:kept`` / ``mbpp-test`` /
    ``mbpp`` -> ``mbpp``; None for a task file (the user's own task) or the held-out share."""
    if target == HOLDOUT or Path(target).suffix in (".yaml", ".yml", ".json"):
        return None
    name = target.split(":")[1] if target.startswith(("gen:", "heldout:", "drift:")) else target.split(":")[0]
    for suffix in ("-train", "-validation", "-test"):
        name = name.removesuffix(suffix)
    return name


def known_families() -> set[str]:
    """The data sets forgetless ships or has a task for (a target naming one of these measures that data set)."""
    from forgetless.eval.tasks import BUILTIN

    return {data_family(n) for n in bundled_names()} | {target_family(t) for t in BUILTIN}


def check_target(target: str | None, data: str, other_target: bool) -> None:
    """Refuse a target on another data set than ``data`` unless ``other_target`` is set. A target that names no
    data set forgetless knows (your own task, by its name or its file) is yours and allowed."""
    if target is None or other_target:
        return
    measured, trained = target_family(target), data_family(data)
    if measured in known_families() and measured != trained:
        raise ConfigError(f"target {target} measures {measured}, but the training data is {data}: leave target unset "
                          f"(a held-out share of your data becomes the target), give your own task file, or set "
                          f"other_target=true to keep it")


def default_target(data: str, behaviour_sources: tuple[str, ...] = ()) -> str:
    """The target when none is given: the held-out share of a user's data; for a bundled split its task (graded
    answers of its validation split when the behaviour measures read them, else the eval task of that name)."""
    if own_data(data):
        return HOLDOUT
    family = data_family(data)
    return f"gen:{family}-validation" if f"{family}-validation" in behaviour_sources else family


def holdout_paths(out_dir: str | Path) -> dict[str, Path]:
    root = Path(out_dir) / HOLDOUT
    return {"train": root / "train.jsonl", "target": root / "target.jsonl", "task": root / "task.yaml"}


def split_holdout(data: str, share: float, seed: int, out_dir: str | Path,
                  max_new_tokens: int = 256) -> dict[str, Path]:
    """Write a seeded split of ``data``: ``share`` of its examples (at least :data:`MIN_HELDOUT`) as the target set,
    the rest as training data, and the task file that scores greedy answers on the target set by chrF.
    Rewritten only when its content changes, so a resumed run reuses its stages."""
    examples = load_examples(data)
    n_target = max(MIN_HELDOUT, round(share * len(examples)))
    if len(examples) - n_target < 1:
        raise ConfigError(f"{data}: {len(examples)} examples are too few to hold out {n_target} as the target and "
                          f"train on the rest; give more data or a target")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_target])
    paths = holdout_paths(out_dir)
    rows = {"train": [], "target": []}
    for i, ex in enumerate(examples):  # file order kept within each part, so `limit` takes the first ones
        record = {"id": ex.id, "messages": ex.messages}
        rows["target" if i in held else "train"].append({**record, "reference": ex.response} if i in held else record)
    for part in ("train", "target"):
        _write_if_changed(paths[part], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[part]))
    task = {"name": HOLDOUT, "data": str(paths["target"].resolve()), "gold": "reference", "metric": "chrf",
            "id": "id", "max_new_tokens": max_new_tokens}
    _write_if_changed(paths["task"], json.dumps(task, indent=2) + "\n")
    return paths


def draw_path(out_dir: str | Path, seed: int) -> Path:
    """Where training draw ``seed`` of a run is written."""
    return Path(out_dir) / "draws" / f"draw-s{seed}.jsonl"


def write_draw(data: str, size: int, seed: int, out_dir: str | Path, limit: int | None = None) -> Path:
    """Training draw ``seed``: ``size`` of the first ``limit`` examples of ``data``, chosen by a shuffle seeded with
    ``seed``, in file order, as ``{"id", "messages"}`` JSONL. Every recipe of the run trains on the same draw at the
    same seed, so which examples were drawn varies between draws and not between recipes. Rewritten only when its
    content changes, so a resumed run reuses its stages."""
    examples = load_examples(data, limit)
    check_draw_size(size, len(examples), data)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    path = draw_path(out_dir, seed)
    _write_if_changed(path, "".join(json.dumps({"id": examples[i].id, "messages": examples[i].messages},
                                               ensure_ascii=False) + "\n" for i in sorted(order[:size])))
    return path


def check_draw_size(size: int, available: int, data: str) -> None:
    if not 1 <= size <= available:
        raise ConfigError(f"draw_size {size}: {data} has {available} examples to draw from (draw_size is in "
                          f"[1, {available}])")


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    artifacts.write_text(path, text)


def tau_share_note(nll: np.ndarray, tau: float, data: str) -> str | None:
    """One line when masking at ``tau`` drops a share of the response tokens (flat NLLs ``nll``) outside
    :data:`USUAL_SHARE`, with the τ that would mask about 20% (``method: auto-tau, fraction: 0.2``); else None.

    >>> tau_share_note(np.log(np.array([1.0, 1.2, 3.0, 4.0, 5.0])), 2.5, "d.jsonl")[:46]
    'τ = 2.5 masks 60% of d.jsonl\\'s response tokens'
    """
    share = float(np.mean(nll > math.log(tau)))
    if USUAL_SHARE[0] <= share <= USUAL_SHARE[1]:
        return None
    suggested = tau_for_fraction(nll, 0.2)
    return (f"τ = {tau:g} masks {share:.0%} of {data}'s response tokens (the paper's τ = 2.5 masked {PAPER_SHARE} of "
            f"its data); τ = {suggested:.3g} would mask about 20% (method: auto-tau, fraction: 0.2)")
