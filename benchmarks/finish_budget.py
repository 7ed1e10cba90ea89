"""At which new-token budget does the base finish its answers? The base's finish rate on a behaviour source as a
function of the budget, from a retention directory's records plus a re-decode of the answers it cut.

    PYTHONPATH=src python benchmarks/finish_budget.py runs/recipes-pilot/retention/base --source gsm8k \
        --budget 1024 --out benchmarks/results/finish_budget-gsm8k.json

An answer that stopped within the recorded budget stopped at its recorded length; each cut answer is decoded again,
greedy, from its prompt with ``--budget`` new tokens, which gives the length at which it stops (or that it does not
stop within ``--budget``). Greedy decoding is deterministic, so the first tokens of the re-decode are the recorded
answer (the script checks it). A recorded answer that finished is counted at its re-tokenized length (exact
at budgets from the recorded one up, approximate below it). The finish rate at budget B is the share of items
whose answer stops within B new tokens, the stop token counted. Cut answers are also classed as loops (the last
300 characters repeat a span, see :func:`is_loop`): a looping answer does not finish at any budget, and its
content stops changing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from forgetless.lm.decode import DecodingSettings, decode_ids
from forgetless.lm.modeling import load_model_and_tokenizer
from forgetless.lm.templates import encode_prompt
from forgetless.retention.answers import prompt_set


def is_loop(text: str, tail: int = 300, min_period: int = 2, max_period: int = 150, share: float = 0.9) -> bool:
    """The last ``tail`` characters repeat with some period p (character i equals character i - p for at least
    ``share`` of them): a model caught in a loop.

    >>> is_loop("intro " + "#### 32\\nThe answer is 32.\\n\\n" * 20)
    True
    >>> is_loop("To solve this, first add 3 and 4 to get 7. Then multiply by 2: 14. So the answer is 14.")
    False
    """
    end = text[-tail:]
    if len(end) < tail:
        return False
    for p in range(min_period, max_period + 1):
        same = sum(end[i] == end[i - p] for i in range(p, len(end)))
        if same >= share * (len(end) - p):
            return True
    return False


def finish_curve(lengths: list[int | None], budgets: list[int]) -> dict[int, float]:
    """Finish rate at each budget: ``lengths`` holds each answer's new tokens with its stop token (None: no stop
    within the longest budget tried).

    >>> finish_curve([10, 200, None, 321], [192, 320, 512])
    {192: 0.25, 320: 0.5, 512: 0.75}
    """
    return {b: sum(n is not None and n <= b for n in lengths) / len(lengths) for b in budgets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", help="a retention directory with gen__<source>.items.jsonl (the base's)")
    parser.add_argument("--source", required=True)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--out")
    args = parser.parse_args()
    directory = Path(args.records)
    recorded_budget = json.loads((directory / f"gen__{args.source}.json").read_text())["settings"]["max_new_tokens"]
    rows = [json.loads(line) for line in (directory / f"gen__{args.source}.items.jsonl").open()]
    ids, messages, _ = prompt_set(args.source, None)
    by_id = dict(zip(ids, messages))
    model, tokenizer = load_model_and_tokenizer("embedded", device="cpu")
    cut = [r for r in rows if not r["finished"]]
    with torch.inference_mode():
        decoded = decode_ids(model, tokenizer, [encode_prompt(tokenizer, by_id[r["id"]]) for r in cut],
                             DecodingSettings(max_new_tokens=args.budget), description=f"cut {args.source} answers")
    lengths, items = [], []
    redone = {r["id"]: d for r, d in zip(cut, decoded)}
    for r in rows:
        if r["finished"]:
            n = len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) + 1
            lengths.append(min(n, recorded_budget))
            items.append({"id": r["id"], "finished_at": lengths[-1], "recorded": True})
            continue
        new, stop = redone[r["id"]]
        text = tokenizer.decode(new, skip_special_tokens=True)
        lengths.append(len(new) + 1 if stop is not None else None)
        items.append({"id": r["id"], "finished_at": lengths[-1], "recorded": False, "loop": is_loop(text),
                      "same_start": text.startswith(r["answer"][:200]), "answer": text})
    budgets = sorted({recorded_budget, 256, 320, 384, 448, 512, 640, 768, 1024, 1280} & set(range(args.budget + 1)))
    curve = finish_curve(lengths, budgets)
    result = {"source": args.source, "n": len(rows), "recorded_budget": recorded_budget, "redecoded": len(cut),
              "redecode_budget": args.budget, "finish_rate": curve,
              "cut_at_redecode_budget": sum(n is None for n in lengths),
              "loops_among_those": sum(bool(i.get("loop")) for i in items if i["finished_at"] is None),
              "redecode_starts_as_recorded": sum(i.get("same_start", True) for i in items if not i["recorded"]),
              "items": items}
    print(json.dumps({k: v for k, v in result.items() if k != "items"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
