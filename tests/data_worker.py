"""Run by tests/test_data_distributed.py under torchrun (2 CPU processes, gloo): the data stages across processes.

``stages ROOT OUT``: score, eval, retention and generate on the tiny models and data of ``ROOT`` (see
:func:`make_world`), each into ``OUT/<stage>``; every process writes ``OUT/world-<rank>.json`` (the launch's size,
and per sharing loop its batches and all).
``score ROOT OUT``: score alone; every process writes how many examples it scored to ``OUT/scored-<rank>.json``.
``score-kill ROOT OUT``: score, with rank 1 killing itself (SIGKILL) right after saving its second part.

Usage: ``torchrun --standalone --nproc_per_node 2 tests/data_worker.py stages ROOT OUT``.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import sys
from pathlib import Path

from conftest import build_tokenizer, save_tiny_model

DATASETS = Path(__file__).resolve().parents[1] / "src" / "forgetless" / "datasets"


def make_world(root: Path) -> Path:
    """A tiny model and a differently seeded base, and small data sets: score conversations of uneven lengths, an
    echo task, GSM8K and MBPP prompts (named ``gsm8k-*`` / ``mbpp-*`` so the behaviour measure reads them as such)."""
    tok = build_tokenizer("chatml")
    save_tiny_model(root / "model", tok, seed=0, max_position_embeddings=2048)
    save_tiny_model(root / "base", tok, seed=1, max_position_embeddings=2048)
    answers = ["def add(a, b):\n    return a + b\n", "print('hello world')", "The quick brown fox jumps."]
    (root / "score.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "prompt": f"Write a python function number {i}.",
                    "response": answers[i % 3] * (1 + i % 4)}) + "\n"
        for i in range(22)))
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"id": f"e{i}", "prompt": f"Write a python function number {i}.", "response": answers[i % 3]}) + "\n"
        for i in range(7)))
    (root / "echo.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "q": f"say {i}" + " please" * (i % 3),
                                                         "a": str(i)}) + "\n"
                                             for i in range(7)))
    (root / "echo.json").write_text(json.dumps({"name": "echo", "data": str(root / "echo.jsonl"), "prompt": "{q}",
                                                "gold": "a", "metric": "numeric", "max_new_tokens": 5}))
    for name, source in (("gsm8k-tiny.jsonl", "gsm8k.jsonl.gz"), ("mbpp-tiny.jsonl", "mbpp-validation.jsonl.gz")):
        with gzip.open(DATASETS / source, "rt", encoding="utf-8") as f:
            (root / name).write_text("".join(next(f) for _ in range(5)))
    return root


def score_config(root: Path, out: Path):
    from forgetless.score.stage import ScoreConfig

    return ScoreConfig(model=str(root / "model"), data=str(root / "score.jsonl"), out_dir=str(out), device="cpu",
                       batch_tokens=96, part_size=2)


def eval_config(root: Path, out: Path):
    from forgetless.eval.stage import EvalConfig

    return EvalConfig(output_dir=str(out), model=str(root / "model"), tasks=(str(root / "echo.json"), "gsm8k"), limit=5,
                      batch_size=2, max_new_tokens=6, cache_dir=str(out / "cache"), device="cpu", progress=False)


def retention_config(root: Path, out: Path):
    """Relative sources: run from ``root``."""
    from forgetless.retention.stage import RetentionConfig

    return RetentionConfig(model=str(root / "model"), base_model=str(root / "base"), mc_tasks=("arc_easy",), mc_limit=7,
                           drift_sources=("gsm8k-tiny.jsonl",), drift_limit=5,
                           behaviour_sources=("gsm8k-tiny.jsonl", "mbpp-tiny.jsonl"), behaviour_limit=5,
                           heldout_source="mbpp-tiny.jsonl", max_new_tokens=6, top_k=16, batch_tokens=512,
                           output_dir=str(out), cache_dir=str(out / "cache"), device="cpu")


def generate_config(root: Path, out: Path):
    from forgetless.generate.stage import GenerateConfig

    return GenerateConfig(model=str(root / "model"), data=str(root / "prompts.jsonl"), samples=2, max_new_tokens=6,
                          batch_size=2, temperature=1.0, device="cpu", out_dir=str(out))


def parity_verifier(*args, **kwargs):
    """Accepts an answer of even length: deterministic, and some samples pass, some fail."""
    from forgetless.generate.verify import Verifier

    return Verifier("parity", lambda example, answer: len(answer) % 2 == 0)


def run_stages(root: Path, out: Path) -> None:
    import forgetless.generate.stage as gen
    from forgetless.eval.stage import run_eval
    from forgetless.lm import distributed
    from forgetless.retention.stage import run_retention
    from forgetless.score.stage import run_score

    distributed.start()
    assert distributed.world_size() == 2 == int(os.environ["WORLD_SIZE"]), "not a 2-process launch"
    real_share, shares = distributed.share, []

    def counting_share(batches, lengths):
        mine = real_share(batches, lengths)
        shares.append([len(mine), len(batches)])
        return mine

    distributed.share = counting_share
    gen.make_verifier = parity_verifier
    os.chdir(root)
    run_score(score_config(root, out / "score"))
    run_eval(eval_config(root, out / "eval"))
    run_retention(retention_config(root, out / "retention"))
    gen.run_generate(generate_config(root, out / "generate"))
    (out / f"world-{distributed.rank()}.json").write_text(json.dumps({"world_size": distributed.world_size(),
                                                                      "shares": shares}))


def run_score_counting(root: Path, out: Path, kill_after: int | None = None) -> None:
    """Score; count the examples this process scores; with ``kill_after``, rank 1 dies after that many parts."""
    import forgetless.lm.scoring as lm_scoring
    import forgetless.score.stage as scoring
    from forgetless.lm import distributed

    distributed.start()
    rank = distributed.rank()
    assert distributed.world_size() == 2 == int(os.environ["WORLD_SIZE"]), "not a 2-process launch"
    real_batch, real_write, scored, parts = lm_scoring.score_batch, scoring.artifacts.write_npz, [], []

    def counting(model, encoded, batch, *args, **kwargs):
        scored.extend(batch)
        return real_batch(model, encoded, batch, *args, **kwargs)

    def saving(path, arrays):
        real_write(path, arrays)
        parts.append(path)
        if kill_after is not None and rank == 1 and len(parts) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    lm_scoring.score_batch, scoring.artifacts.write_npz = counting, saving
    run_score_out = scoring.run_score(score_config(root, out / "score"))
    Path(out / f"scored-{rank}.json").write_text(json.dumps({"scored": len(scored), "parts": len(parts),
                                                             "out": str(run_score_out)}))


if __name__ == "__main__":
    mode, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "stages":
        run_stages(root, out)
    else:
        run_score_counting(root, out, kill_after=2 if mode == "score-kill" else None)
