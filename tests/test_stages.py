"""The score and mask stages end to end on a tiny saved model: outputs, caching, invalidation."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import build_tokenizer, cli, kill_mid_run, run_to_end
from forgetless.mask.stage import MaskConfig, run_mask
from forgetless.lm.batching import length_buckets
from forgetless.score.stage import ScoreConfig, run_score


@pytest.fixture
def data_file(tmp_path):
    rows = [
        {"id": f"ex{i}", "messages": [{"role": "user", "content": f"Write a python function number {i}."},
                                      {"role": "assistant",
                                       "content": "def add(a, b):\n    return a + b" + " + 0" * i}]}
        for i in range(6)
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def score(model_dir, data_file, out, **kw):
    return run_score(ScoreConfig(model=str(model_dir), data=str(data_file), out_dir=str(out), device="cpu",
                                 batch_tokens=128, **kw))


def flat_nll(table):
    return np.concatenate([np.asarray(x, dtype=np.float64) for x in table.column("nll").to_pylist()])


def test_scores_file_columns_and_alignment(tiny_model_dir, data_file, tmp_path):
    out = score(tiny_model_dir, data_file, tmp_path / "scores")
    table = pq.read_table(out / "scores.parquet")
    assert table.column_names[:4] == ["id", "input_ids", "response_mask", "nll"]
    assert table.column("id").to_pylist() == [f"ex{i}" for i in range(6)]  # input order survives bucketing
    for ids, resp, nll in zip(*(table.column(c).to_pylist() for c in ("input_ids", "response_mask", "nll"))):
        assert len(ids) == len(resp) == len(nll)
        assert math.isnan(nll[0])
        assert all(math.isnan(v) != bool(r) for v, r in zip(nll[1:], resp[1:]))
    stats = json.loads((out / "stats.json").read_text())
    n_resp = sum(sum(r[1:]) for r in table.column("response_mask").to_pylist())
    assert stats["response_tokens"] == n_resp
    assert set(stats["fraction_above"]) == {"1.5", "2.5", "10.0", "25.0", "100.0", "1000.0"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"model", "template", "data", "max_length"} <= set(manifest["key"]) and "torch" in manifest["versions"]


def test_padding_free_scoring_stage_equals_padded(tiny_model_dir, data_file, tmp_path, caplog):
    """``padding_free`` and ``attn_implementation`` reach the scoring (eager packs through a dense mask, so it scores
    padded and says why): the same NLLs as padded sdpa batches."""
    padded = pq.read_table(score(tiny_model_dir, data_file, tmp_path / "padded") / "scores.parquet")
    flat = pq.read_table(score(tiny_model_dir, data_file, tmp_path / "flat", padding_free=True,
                               attn_implementation="eager") / "scores.parquet")
    # Said once for the stage, not once per batch (the stage scores its 6 examples in more than one batch).
    assert caplog.text.count("with eager attention a packed row attends over its whole length") == 1
    a, b = flat_nll(padded), flat_nll(flat)
    assert (np.isnan(a) == np.isnan(b)).all() and np.nanmax(np.abs(a - b)) < 1e-5


def test_rerun_reuses_and_changes_invalidate(tiny_model_copy, data_file, tmp_path, caplog):
    out = score(tiny_model_copy, data_file, tmp_path / "scores")
    mtime = (out / "scores.parquet").stat().st_mtime_ns
    score(tiny_model_copy, data_file, tmp_path / "scores")
    assert (out / "scores.parquet").stat().st_mtime_ns == mtime  # reused
    caplog.set_level("INFO")
    score(tiny_model_copy, data_file, tmp_path / "scores", max_length=200)
    assert "max_length changed" in caplog.text
    assert (out / "scores.parquet").stat().st_mtime_ns != mtime
    data_file.write_text(data_file.read_text().replace("number 1.", "number one."))
    caplog.clear()
    score(tiny_model_copy, data_file, tmp_path / "scores", max_length=200)
    assert "data changed" in caplog.text
    tok = build_tokenizer("chatml")
    tok.chat_template = tok.chat_template.replace("helpful", "careful")
    tok.save_pretrained(tiny_model_copy)
    caplog.clear()
    score(tiny_model_copy, data_file, tmp_path / "scores", max_length=200)
    assert "template changed" in caplog.text


def test_truncation_and_skip_are_counted(tiny_model_dir, data_file, tmp_path):
    lengths = [len(r) for r in pq.read_table(score(tiny_model_dir, data_file, tmp_path / "a") / "scores.parquet")
               .column("input_ids").to_pylist()]
    limit = sorted(lengths)[3]  # the two longest... three longest exceed it or equal
    over = sum(n > limit for n in lengths)
    a = json.loads((score(tiny_model_dir, data_file, tmp_path / "b", max_length=limit) / "stats.json").read_text())
    b = json.loads((score(tiny_model_dir, data_file, tmp_path / "c", max_length=limit, overlong="skip")
                    / "stats.json").read_text())
    assert a["truncated"] == over and a["scored_examples"] == 6
    assert b["skipped_overlong"] == over and b["scored_examples"] == 6 - over


def test_length_buckets_respect_budget_and_cover_all():
    lengths = [5, 30, 12, 30, 7, 100]
    batches = length_buckets(lengths, batch_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 60
    assert batches[0] == [5]  # longest first, alone


def test_mask_stage_labels_and_weights(tiny_model_dir, data_file, tmp_path):
    scores = score(tiny_model_dir, data_file, tmp_path / "scores")
    table = pq.read_table(scores / "scores.parquet")
    out = run_mask(MaskConfig(scores=str(scores), policy="threshold", tau=2.5, out_dir=str(tmp_path / "m")))
    masked = pq.read_table(out / "data.parquet")
    stats = json.loads((out / "mask_stats.json").read_text())
    n_masked = 0
    for ids, resp, nll, labels, weight in zip(*(masked.column(c).to_pylist()
                                                for c in ("input_ids", "response_mask", "nll", "labels",
                                                          "loss_weight"))):
        for i, (t, r, s, lab, w) in enumerate(zip(ids, resp, nll, labels, weight)):
            trained = bool(r) and i > 0 and s <= math.log(2.5)
            assert lab == (t if trained else -100)
            assert w == (1.0 if trained else 0.0)
            n_masked += bool(r) and i > 0 and not trained
    assert stats["masked_tokens"] == n_masked
    assert stats["masked_fraction"] == pytest.approx(n_masked / stats["response_tokens"])
    nll_flat = np.concatenate([np.asarray(n)[1:][np.asarray(r[1:], bool)]
                               for n, r in zip(table.column("nll").to_pylist(),
                                               table.column("response_mask").to_pylist())])
    assert n_masked == int((nll_flat > math.log(2.5)).sum())


def test_mask_stage_counts_examples_left_without_tokens(tiny_model_dir, data_file, tmp_path):
    scores = score(tiny_model_dir, data_file, tmp_path / "scores")
    out = run_mask(MaskConfig(scores=str(scores), policy="threshold", tau=1.0000001, out_dir=str(tmp_path / "m")))
    stats = json.loads((out / "mask_stats.json").read_text())
    assert stats["examples_without_trained_tokens"] == 6 and stats["trained_tokens"] == 0


def random_adapter(model_dir, out):
    """A LoRA adapter with random (non-zero) B on the saved tiny model: a stand-in for a fine-tuned model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(base,
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(out)
    return out


@pytest.mark.parametrize("policy, tau", [("dpf", 2.5), ("dpf+stm", 400.0)])
def test_dpf_masks_from_the_base_and_the_tuned_scores(tiny_model_dir, data_file, tmp_path, policy, tau):
    base = score(tiny_model_dir, data_file, tmp_path / "base")
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    tuned = score(tiny_model_dir, data_file, tmp_path / "tuned", adapter=str(adapter))
    assert json.loads((tuned / "manifest.json").read_text())["key"]["adapter"] is not None
    with pytest.raises(ValueError, match="needs reference_scores"):
        MaskConfig(scores=str(base), policy=policy)
    out = run_mask(MaskConfig(scores=str(base), policy=policy, tau=tau, reference_scores=str(tuned),
                              out_dir=str(tmp_path / "m")))
    columns = ("input_ids", "response_mask", "nll", "labels")
    rows = zip(*(pq.read_table(out / "data.parquet").column(c).to_pylist() for c in columns),
               pq.read_table(tuned / "scores.parquet").column("nll").to_pylist())
    kinds = set()
    for ids, resp, nll_base, labels, nll_tuned in rows:
        for i in range(1, len(ids)):
            if not resp[i]:
                continue
            ppl_base, ppl_tuned = math.exp(nll_base[i]), math.exp(nll_tuned[i])
            if policy == "dpf":
                dropped = ppl_tuned - ppl_base > tau
            else:
                dropped = ppl_base > tau or ppl_tuned > ppl_base
            assert labels[i] == (-100 if dropped else ids[i])
            kinds.add(dropped)
    assert kinds == {True, False}  # the example has both kinds of tokens


def test_mask_stage_needs_finished_scores(tmp_path):
    with pytest.raises(FileNotFoundError, match="forgetless score"):
        run_mask(MaskConfig(scores=str(tmp_path / "nothing"), out_dir=str(tmp_path / "m")))


def test_crash_mid_scoring_resumes_and_equals_uninterrupted(tiny_model_dir, data_file, tmp_path, monkeypatch):
    import forgetless.lm.scoring as lm_scoring
    import forgetless.score.stage as scoring

    real_batch, scored = lm_scoring.score_batch, []
    monkeypatch.setattr(lm_scoring, "score_batch", lambda *a, **k: (scored.append(len(a[2])), real_batch(*a, **k))[1])
    full = pq.read_table(score(tiny_model_dir, data_file, tmp_path / "full", part_size=2) / "scores.parquet")
    assert sum(scored) == 6
    parts = tmp_path / "crash" / "parts"
    real_write = scoring.artifacts.write_npz

    def crash_on_second_part(path, arrays):
        if list(parts.glob("part-*.npz")):
            raise KeyboardInterrupt  # stands in for a kill between parts
        real_write(path, arrays)

    monkeypatch.setattr(scoring.artifacts, "write_npz", crash_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        score(tiny_model_dir, data_file, tmp_path / "crash", part_size=2)
    assert not (tmp_path / "crash" / "manifest.json").exists() and not (tmp_path / "crash" / "scores.parquet").exists()
    [first] = parts.glob("part-*.npz")
    with np.load(first) as saved:
        kept = len(saved["index"])
    assert 2 <= kept < 6  # whole batches of at least part_size examples
    scored.clear()
    monkeypatch.setattr(scoring.artifacts, "write_npz", real_write)
    resumed = pq.read_table(score(tiny_model_dir, data_file, tmp_path / "crash", part_size=2) / "scores.parquet")
    assert sum(scored) == 6 - kept  # the saved part came from disk
    assert resumed.column("id").to_pylist() == full.column("id").to_pylist()
    # The same batches; the resumed run's shared prompt prefix is taken from the batches left, so its KV cache may
    # cover other tokens than the full run's: the same numbers up to fp32 reduction order.
    np.testing.assert_allclose(flat_nll(resumed), flat_nll(full), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert not parts.exists()


def test_kill_9_during_scoring_then_rerun(tiny_model_dir, tmp_path):
    import re

    rows = [{"prompt": f"Write a python function number {i}.",
             "response": "def add(a, b):\n    return a + b" * (1 + i % 5)} for i in range(60)]
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "killed"
    cmd = cli("score", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "part_size=1",
              "batch_tokens=64", "device=cpu")
    # Killed mid-run: part 2 saved, the last of the 60 parts and the results not yet.
    kill_mid_run(cmd, out, trigger=out / "parts" / "part-00002.npz",
                 too_late=[out / "parts" / "part-00059.npz", out / "scores.parquet", out / "manifest.json"])
    saved = sum(len(np.load(p)["index"]) for p in (out / "parts").glob("part-*.npz"))
    assert 3 <= saved < 60
    done = run_to_end(cmd)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = re.search(r"resuming: (\d+) of 60 examples", done.stderr)
    assert resumed and int(resumed.group(1)) == saved  # the re-run kept every saved part
    reference = score(tiny_model_dir, data, tmp_path / "clean")
    a, b = (flat_nll(pq.read_table(d / "scores.parquet")) for d in (out, reference))
    assert np.allclose(a, b, equal_nan=True, atol=1e-5)
    assert not list(out.glob(".*.tmp"))


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    import os

    from forgetless.lm.artifacts import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
