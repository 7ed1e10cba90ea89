"""``samples.jsonl``: every sampled answer of every prompt, verified and scored, saved batch by batch.

One line per prompt as soon as its batch is done (every sampled answer, whether it passed the task's verifier, its
per-token NLL under the base model). A re-run with the same settings skips the prompts already there, so an
interrupted run continues. Each batch is sampled from its own seed (:func:`forgetless.lm.decode.batch_seed`), so a
resumed batch, or one sampled by another process, gives the same answers.

Under a launcher (:mod:`forgetless.lm.distributed`) the processes share the batches; each appends its prompts to its
own file (``samples.jsonl`` on the first, ``samples.rank<R>.jsonl`` on the others), and at the end the first
rewrites ``samples.jsonl`` with every prompt, in the data's order. A crash loses at most one batch per process, and
the re-run (with any number of processes) reads every file.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from forgetless.core.errors import DataError
from forgetless.core.tokenstats import scored_response_nll
from forgetless.generate.config import GenerateConfig
from forgetless.generate.verify import Verifier
from forgetless.lm import artifacts, distributed
from forgetless.lm.data import Example
from forgetless.lm.decode import DecodingSettings, batch_seed
from forgetless.lm.progress import progress
from forgetless.lm.templates import encode_conversation, encode_prompt

logger = logging.getLogger(__name__)

SAMPLES_FILE, SAMPLES_KEY = "samples.jsonl", "samples_key.json"


def generation_prompt(config: GenerateConfig, example: Example) -> list[dict[str, str]]:
    """What the base model is asked: the example's own prompt (self_output) or the rephrase request."""
    if config.method != "rephrase":
        return example.prompt_messages
    instruction = next(m["content"] for m in reversed(example.prompt_messages) if m["role"] == "user")
    text = config.rephrase_template.replace("{instruction}", instruction).replace("{reference}", example.response)
    return [{"role": "user", "content": text}]


def own_file(out: Path) -> Path:
    """The samples file this process appends to."""
    r = distributed.rank()
    return out / (SAMPLES_FILE if r == 0 else f"samples.rank{r}.jsonl")


def sample_files(out: Path) -> list[Path]:
    """Every samples file in ``out``: ``samples.jsonl``, then those of other processes of a launch."""
    return [p for p in [out / SAMPLES_FILE, *sorted(out.glob("samples.rank*.jsonl"))] if p.is_file()]


def read_done(path: Path) -> dict[str, dict]:
    """Per-prompt records already in ``samples.jsonl`` (or a process's own samples file).

    A torn line (a crash mid-write) is dropped and the file rewritten without it, so that
    appending cannot glue the next record onto it.
    """
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    text = path.read_text(encoding="utf-8")
    good = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: dropping an incomplete line (interrupted write)", path, line_no)
            continue
        done[record["id"]] = record
        good.append(line)
    if len(good) != len(text.splitlines()) or (text and not text.endswith("\n")):
        artifacts.write_text(path, "".join(line + "\n" for line in good))
    return done


def read_all_done(out: Path) -> dict[str, dict]:
    """Records of every samples file in ``out`` (the first process mends torn lines before the others read)."""
    if distributed.is_main():
        for path in sample_files(out):
            read_done(path)
    distributed.barrier()
    done: dict[str, dict] = {}
    for path in sample_files(out):
        done.update({k: v for k, v in read_done(path).items() if k not in done})
    return done


def response_nlls(engine, prompts: list[list[dict]], answers: list[str], config: GenerateConfig) -> list[np.ndarray]:
    """Response-token NLLs of each answer after its prompt, under the engine's model (as training would encode it);
    this process's own work (nothing shared)."""
    encoded = [encode_conversation(engine.tokenizer, [*p, {"role": "assistant", "content": a}], config.max_length)
               for p, a in zip(prompts, answers)]
    nlls = engine.score(encoded)
    return [scored_response_nll(n, np.asarray(e.response_mask, dtype=bool)) for n, e in zip(nlls, encoded)]


def process_batch(engine, examples: list[Example], config: GenerateConfig, verifier: Verifier, seed: int) -> list[dict]:
    """Sample (seeded ``seed``), verify and score one batch (this process's own: nothing shared);
    one record per example."""
    prompt_ids = [encode_prompt(engine.tokenizer, generation_prompt(config, ex)) for ex in examples]
    settings = DecodingSettings(config.max_new_tokens, greedy=False, temperature=config.temperature, top_p=config.top_p)
    sampled = engine.sample(prompt_ids, config.samples, settings, seed)
    pairs = [(i, s) for i, row in enumerate(sampled) for s, one in enumerate(row) if one.text.strip()]
    # The ground truth goes through the same verifier: its pass rate checks the verifier.
    checks = verifier.many([examples[i] for i, _ in pairs] + examples,
                           [sampled[i][s].text for i, s in pairs] + [ex.response for ex in examples])
    nlls = response_nlls(engine, [examples[i].prompt_messages for i, _ in pairs],
                         [sampled[i][s].text for i, s in pairs], config)
    found = {pair: (ok, nll) for pair, ok, nll in zip(pairs, checks, nlls)}
    records = []
    for i, ex in enumerate(examples):
        rows = []
        for s, one in enumerate(sampled[i]):
            ok, nll = found.get((i, s), (False, None))
            rows.append({"index": s, "text": one.text, "finished": one.finished, "new_tokens": one.new_tokens,
                         "verified": ok, "mean_nll": None if nll is None or not len(nll) else float(nll.mean()),
                         "token_nll": None if nll is None else [round(float(x), 4) for x in nll]})
        records.append({"id": ex.id, "ground_truth_verified": checks[len(pairs) + i], "samples": rows})
    return records


def generate_samples(engine, examples: list[Example], config: GenerateConfig, verifier: Verifier,
                     out: Path) -> dict[str, dict]:
    """Run every batch not yet in a samples file, appending its records as it finishes; every record of
    ``examples`` (on every process)."""
    out.mkdir(parents=True, exist_ok=True)
    done = read_all_done(out)
    distributed.barrier()  # every process reads the same records before any appends (else their shares differ)
    batches = [list(range(b, min(b + config.batch_size, len(examples))))
               for b in range(0, len(examples), config.batch_size)]
    todo = [b for b, rows in enumerate(batches) if any(examples[i].id not in done for i in rows)]
    if done:
        logger.info("resuming: %d of %d prompts already sampled", sum(ex.id in done for ex in examples), len(examples))
    # The time of a batch is mostly its answers, unknown beforehand: batches are shared by count.
    mine = [b for [b] in distributed.share([[b] for b in todo], [len(rows) for rows in batches])]
    new: dict[int, dict] = {}
    with open(own_file(out), "a", encoding="utf-8") as f:
        for b in progress(mine, f"generating ({config.method})", total_items=sum(len(batches[b]) for b in mine),
                          count=lambda b: len(batches[b])):
            tic = time.monotonic()
            records = process_batch(engine, [examples[i] for i in batches[b]], config, verifier,
                                    batch_seed(config.seed, b))
            for i, record in zip(batches[b], records):
                if record["id"] not in done:  # a partly written batch is re-sampled identically; keep the first copy
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    new[i] = record
            f.flush()
            rows_done = [s for r in records for s in r["samples"]]
            logger.info("batch %d/%d: %d of %d samples verified, %d new tokens in %.0f s", b + 1, len(batches),
                        sum(s["verified"] is True for s in rows_done), len(rows_done),
                        sum(s["new_tokens"] for s in rows_done), time.monotonic() - tic)
    known = {i: done[ex.id] for i, ex in enumerate(examples) if ex.id in done} if distributed.is_main() else {}
    records = distributed.gather({**known, **new}, len(examples))
    if distributed.is_main() and len(sample_files(out)) > 1:
        merge_sample_files(out, [ex.id for ex in examples])
    return {**done, **{r["id"]: r for r in records}}


def merge_sample_files(out: Path, order: list[str]) -> None:
    """One ``samples.jsonl`` from every process's file: the prompts of ``order`` first, in that order."""
    done: dict[str, dict] = {}
    for path in sample_files(out):
        done.update({k: v for k, v in read_done(path).items() if k not in done})
    wanted = set(order)
    ids = [i for i in order if i in done] + [i for i in done if i not in wanted]
    artifacts.write_text(out / SAMPLES_FILE, "".join(json.dumps(done[i], ensure_ascii=False) + "\n" for i in ids))
    for path in sample_files(out)[1:]:
        path.unlink()


def check_samples_key(out: Path, sampling: dict) -> None:
    """Refuse to append to samples made with other settings (they would mix); record the settings otherwise."""
    path = out / SAMPLES_KEY
    if path.is_file() and sample_files(out):
        changed = artifacts.stale_fields(artifacts.read_json(path), sampling)
        if changed:
            raise DataError(f"{out / SAMPLES_FILE} was sampled with other settings ({', '.join(changed)} changed): "
                             "use another out_dir or delete it to start over")
        return
    if distributed.is_main():
        artifacts.write_json(path, sampling)
