"""ARC-Challenge (test, 1172 items), generative: the model is asked for the letter of the answer,
as in the paper. (The log-likelihood-over-choices variant, lm-eval's way, is in
``forgetless.retention``.) ARC records carry no prompt, so this one is ours, answered in 16 tokens;
``arc_challenge-paper`` (:mod:`forgetless.eval.tasks.paper`) is the authors' 'Answer: $LETTER'
prompt and reading, 512 tokens."""

from __future__ import annotations

import re

from forgetless.lm.data import load_records
from forgetless.eval.tasks import Item, Task

PROMPT = ("Answer the following multiple-choice science question. Reply with the letter of the correct "
          "choice only.\n\nQuestion: {question}\n{choices}\nAnswer:")


def format_prompt(record: dict) -> str:
    choices = "\n".join(f"{label}. {text}"
                        for label, text in zip(record["choices"]["label"], record["choices"]["text"]))
    return PROMPT.format(question=record["question"], choices=choices)


def extract_letter(output: str, labels: list[str]) -> str | None:
    """The chosen label: 'The answer is (B)', 'Answer: B', 'B. ...', '(B)', or a lone label; None if unclear."""
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    patterns = [
        rf"answer\s*(?:is|:)?\s*(?:option\s*)?[\(\[]?\s*({alternatives})\b",
        rf"^\s*[\(\[]?({alternatives})[\)\]]?(?:[\.\):,\s]|$)",
        rf"(?:^|[\s\(\[])({alternatives})(?:[\)\]\.,:]|\s|$)",
    ]
    for pattern in patterns:
        match = re.search(pattern, output, flags=re.IGNORECASE if pattern is patterns[0] else 0)
        if match:
            return match.group(1).upper() if match.group(1).upper() in labels else match.group(1)
    return None


def load_arc(source: str = "arc_challenge-test") -> list[Item]:
    records, _ = load_records(source)
    return [Item(id=str(r["id"]), messages=[{"role": "user", "content": format_prompt(r)}], gold=r["answerKey"],
                 record=r)
            for r in records]


def arc_task(source: str = "arc_challenge-test") -> Task:
    return Task(name="arc_challenge", metric="accuracy", load=lambda: load_arc(source),
                extract=lambda o, it: extract_letter(o, it.record["choices"]["label"]),
                score=lambda pred, it: float(pred == it.gold), max_new_tokens=16, chance=0.25,
                definition={"source": source, "prompt": PROMPT})
