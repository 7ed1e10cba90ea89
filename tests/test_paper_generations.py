"""The authors' bundled Llama-3-8B generations load as training examples with the right counts."""

from __future__ import annotations

import pytest

from forgetless.lm.data import DataError, load_examples, read_jsonl
from forgetless.generate.paper import generation_files, load_paper_generations


def _fallbacks(examples):
    return sum(ex.meta["provenance"]["fallback"] for ex in examples)


def test_rephrase_train_counts_and_fallback_to_ground_truth():
    examples = load_paper_generations("rephrase", "train")
    truth = load_examples("mbpp-train")
    assert len(examples) == 374
    assert _fallbacks(examples) == 49  # 325 prompts have an accepted rephrase
    assert [ex.id for ex in examples] == [ex.id for ex in truth]
    for ex, gt in zip(examples, truth):
        assert ex.prompt_messages == gt.prompt_messages
        assert (ex.response == gt.response) or not ex.meta["provenance"]["fallback"]
        if ex.meta["provenance"]["fallback"]:
            assert ex.meta["provenance"]["source"] == "ground_truth" and ex.response == gt.response
        else:
            assert ex.meta["provenance"]["source"] == "paper_rephrase"
    assert examples[0].meta["test_list"] == truth[0].meta["test_list"]


def test_self_output_validation_lowest_ppl_choice():
    examples = load_paper_generations("self_output", "validation", choose="lowest-ppl")
    assert len(examples) == 90 and _fallbacks(examples) == 19
    _, with_ppl = generation_files("self_output", "validation")
    by_row = {r["row_id"]: r for r in read_jsonl(with_ppl)}
    for row, ex in enumerate(examples):
        if row in by_row:
            model = [a for a in by_row[row]["accept"] if a["src"] != "ground_truth"]
            best = min(model, key=lambda a: a["ppl"])
            assert ex.response == best["content"]
            assert ex.meta["provenance"]["paper_ppl"] == pytest.approx(best["ppl"])
            assert ex.meta["provenance"]["accepted"] == len(model)
    first = load_paper_generations("self_output", "validation", choose="first")
    assert sum(a.response != b.response for a, b in zip(examples, first)) > 0


def test_missing_combination_is_a_clear_error():
    with pytest.raises(DataError, match="rephrase:train"):
        load_paper_generations("self_output", "train")
