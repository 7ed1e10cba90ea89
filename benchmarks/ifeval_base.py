"""The embedded base model's answers to all 541 IFEval prompts, greedy, written as they finish so that an interrupted
run resumes; then scored by ``forgetless eval tasks=[ifeval] predictions=...`` at the full budget and cut to smaller
ones (greedy decoding is deterministic, so the first B tokens of an answer are the answer at budget B).

    PYTHONPATH=src python benchmarks/ifeval_base.py --out runs/ifeval-base-541 --max-new-tokens 1280
    forgetless eval tasks=[ifeval] predictions=runs/ifeval-base-541/predictions-1280.jsonl \
        --output-dir runs/ifeval-base-541/eval-1280

``answers.jsonl`` holds one line per prompt: its IFEval key, the new token ids and whether the answer stopped on its
own. ``predictions-<B>.jsonl`` (lines ``{"task": "ifeval", "id", "output"}``) are written for each ``--cut`` budget
once every prompt is answered, with the share of answers that stopped within B in ``finish.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from forgetless.eval.tasks.ifeval import load_ifeval
from forgetless.lm.decode import DecodingSettings, decode_ids
from forgetless.lm.modeling import load_model_and_tokenizer, load_tokenizer
from forgetless.lm.templates import encode_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=1280)
    parser.add_argument("--chunk", type=int, default=64, help="prompts decoded between two writes")
    parser.add_argument("--cut", type=int, nargs="*", default=[512, 1280])
    parser.add_argument("--limit", type=int, help="the first N prompts only (a smoke test)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    answers_file = out / "answers.jsonl"
    done = {}
    if answers_file.is_file():
        for line in answers_file.read_text().splitlines():
            row = json.loads(line)
            if row.get("max_new_tokens") == args.max_new_tokens:
                done[row["id"]] = row
    items = load_ifeval()[:args.limit]
    todo = [it for it in items if str(it.id) not in done]
    print(f"{len(done)} of {len(items)} answered already; {len(todo)} to go", flush=True)
    if todo:
        model, tokenizer = load_model_and_tokenizer("embedded", device="cpu")
        settings = DecodingSettings(max_new_tokens=args.max_new_tokens)
        with torch.inference_mode(), answers_file.open("a") as f:
            for start in range(0, len(todo), args.chunk):
                chunk = todo[start:start + args.chunk]
                decoded = decode_ids(model, tokenizer, [encode_prompt(tokenizer, it.messages) for it in chunk],
                                     settings, description=f"IFEval {len(done)}/{len(items)}")
                for it, (new, stop) in zip(chunk, decoded):
                    row = {"id": str(it.id), "new": list(new), "finished": stop is not None,
                           "max_new_tokens": args.max_new_tokens}
                    done[row["id"]] = row
                    f.write(json.dumps(row) + "\n")
                f.flush()
    else:
        tokenizer = load_tokenizer("embedded")
    finish = {}
    for budget in args.cut:
        rows = [done[str(it.id)] for it in items]
        with (out / f"predictions-{budget}.jsonl").open("w") as f:
            for row in rows:
                text = tokenizer.decode(row["new"][:budget], skip_special_tokens=True)
                f.write(json.dumps({"task": "ifeval", "id": row["id"], "output": text}) + "\n")
        # stopped within B: its new tokens plus the stop token fit in B
        finish[budget] = sum(r["finished"] and len(r["new"]) + 1 <= budget for r in rows) / len(rows)
    (out / "finish.json").write_text(json.dumps({"n": len(items), "finish_rate": finish}, indent=1) + "\n")
    print(json.dumps(finish), flush=True)


if __name__ == "__main__":
    main()
