"""The authors' Llama-3-8B-Instruct generations for MBPP, as training examples.

Bundled under ``forgetless/datasets/paper_generations/`` (see ``datasets/README.md``):

* ``rephrase`` (train 374, validation 90 prompts): the model rewrote the reference answer, 1 sample;
* ``self_output`` (validation 90 prompts): 32 samples a prompt.

Each line holds ``instruction`` (the prompt), ``accept`` (answers that passed the tests; the
reference itself is among them with ``src == "ground_truth"``), ``rejection`` and ``row_id``
(the row of ``mbpp-<split>``). The ``*_wrejppl`` files hold the same prompts that have a model
answer, with the perplexity of each answer under the authors' model (``ppl``), which the
``lowest-ppl`` rule ranks by. A prompt without an accepted model answer falls back to the
ground truth of ``mbpp-<split>``, matched by prompt text.
"""

from __future__ import annotations

import random
from pathlib import Path

from forgetless.core.errors import ConfigError
from forgetless.lm.data import DataError, Example, bundled_dir, load_examples, read_jsonl

KINDS = {"self_output": ("self-output", 32), "rephrase": ("rephrase", 1)}
CHOICES = ("lowest-ppl", "first", "random")
_MODEL = "meta-llama-Meta-Llama-3-8B-Instruct"


def generation_files(kind: str, split: str) -> tuple[Path, Path]:
    """(answers file, answers-with-ppl file) of one kind and split; DataError if not bundled."""
    if kind not in KINDS:
        raise DataError(f"unknown paper generation kind {kind!r}; choose {', '.join(KINDS)}")
    prefix, n = KINDS[kind]
    stem = bundled_dir() / "paper_generations" / f"{prefix}__mbpp_{_MODEL}_sample_{split}_t_0.7_{n}"
    base, with_ppl = Path(f"{stem}.jsonl.gz"), Path(f"{stem}_wrejppl.jsonl.gz")
    if not base.is_file():
        available = sorted(p.name.split("__")[0] + ":" + p.name.split("_sample_")[1].split("_t_")[0]
                           for p in base.parent.glob("*.jsonl.gz") if "wrejppl" not in p.name)
        raise DataError(f"no paper generations for {kind} on MBPP {split}; bundled: {', '.join(available)}")
    return base, with_ppl


def model_answers(record: dict, ppl_of: dict[str, float]) -> list[dict]:
    """The accepted answers written by the model (not the reference), in file order, with ppl where known."""
    answers = []
    for a in record.get("accept", []):
        if a.get("src") == "ground_truth" or not a.get("correct", True):
            continue
        answers.append({"content": a["content"], "order": int(a.get("order", len(answers))),
                        "ppl": a.get("ppl", ppl_of.get(a["content"]))})
    return answers


def model_rejections(record: dict) -> int:
    """Model answers that failed the tests (the reference also sits in ``rejection``, as a bare string)."""
    return sum(isinstance(r, dict) and r.get("src") != "ground_truth" for r in record.get("rejection", []))


def choose_answer(answers: list[dict], choose: str, rng: random.Random) -> int:
    """Index of the chosen answer. ``lowest-ppl`` without any ppl falls back to ``first``.

    >>> choose_answer([{"ppl": 2.0}, {"ppl": 1.5}, {"ppl": None}], "lowest-ppl", random.Random(0))
    1
    """
    if choose not in CHOICES:
        raise ConfigError(f"unknown choice rule {choose!r}; choose {', '.join(CHOICES)}")
    if choose == "random":
        return rng.randrange(len(answers))
    if choose == "lowest-ppl":
        ranked = [i for i, a in enumerate(answers) if a.get("ppl") is not None]
        if ranked:
            return min(ranked, key=lambda i: float(answers[i]["ppl"]))
    return 0


def load_paper_generations(kind: str, split: str = "train", choose: str = "lowest-ppl", seed: int = 0) -> list[Example]:
    """One training example per prompt of ``mbpp-<split>``, in split order, with ``meta["provenance"]``."""
    base, with_ppl = generation_files(kind, split)
    ground_truth = load_examples(f"mbpp-{split}")
    by_prompt = {ex.messages[0]["content"]: ex for ex in ground_truth}
    ppl_of: dict[int, dict[str, float]] = {}
    if with_ppl.is_file():
        for r in read_jsonl(with_ppl):
            ppl_of[r["row_id"]] = {a["content"]: a["ppl"] for a in r.get("accept", []) if "ppl" in a}
    rng = random.Random(seed)
    examples = []
    for record in read_jsonl(base):
        gt = by_prompt.get(record["instruction"])
        if gt is None:
            raise DataError(f"{base.name}: row {record.get('row_id')} matches no prompt of mbpp-{split}")
        answers = model_answers(record, ppl_of.get(record["row_id"], {}))
        source = f"paper_{kind}"
        if answers:
            pick = choose_answer(answers, choose, rng)
            answer, ppl = answers[pick]["content"], answers[pick]["ppl"]
            provenance = {"source": source, "sample_index": answers[pick]["order"], "verified": True,
                          "paper_ppl": None if ppl is None else float(ppl), "fallback": False,
                          "accepted": len(answers), "rejected": model_rejections(record)}
        else:
            answer = gt.response
            provenance = {"source": "ground_truth", "sample_index": None, "verified": True, "paper_ppl": None,
                          "fallback": True, "accepted": 0, "rejected": model_rejections(record)}
        meta = {**gt.meta, "provenance": provenance}
        examples.append(Example(id=gt.id, messages=[*gt.prompt_messages, {"role": "assistant", "content": answer}],
                                meta=meta))
    return examples
