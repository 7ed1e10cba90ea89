"""Drift from the base and held-out NLL by kind: hand-computed values, zero for no change, cache."""

from __future__ import annotations

import math

import pytest
import torch

from forgetless.retention import answers as answers_mod
from forgetless.retention.basecache import weights_digest
from forgetless.retention.drift import coarse_kl, evaluate_drift, exact_kl, item_drift
from forgetless.retention.heldout import evaluate_heldout, split_by_kind


def test_kl_directions_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.2]]).log()
    q = torch.tensor([[0.25, 0.25, 0.5]]).log()
    kl_pq, kl_qp = coarse_kl(p, q)
    # KL(p||q) = .5 ln 2 + .3 ln 1.2 + .2 ln .4 ; KL(q||p) = .25 ln .5 + .25 ln(5/6) + .5 ln 2.5
    assert float(kl_pq) == pytest.approx(0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.2 * math.log(0.4))
    assert float(kl_qp) == pytest.approx(0.25 * math.log(0.5) + 0.25 * math.log(5 / 6) + 0.5 * math.log(2.5))
    assert float(kl_pq) == pytest.approx(0.218012, abs=1e-6) and float(kl_qp) == pytest.approx(0.239279, abs=1e-6)
    # Only the first two tokens named: the third is the lumped tail, same numbers (one-token tail).
    assert float(coarse_kl(p[:, :2], q[:, :2])[0]) == pytest.approx(float(kl_pq))


def test_coarse_kl_is_a_lower_bound_and_exact_with_full_vocab():
    torch.manual_seed(0)
    a, b = torch.randn(5, 50) * 2, torch.randn(5, 50) * 2
    logp, logq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    exact = exact_kl(a, b)
    top = logp.topk(8, dim=-1).indices
    coarse, _ = coarse_kl(logp.gather(1, top), logq.gather(1, top))
    assert (coarse <= exact + 1e-9).all() and (coarse > 0).all()
    full, _ = coarse_kl(logp, logq)
    assert torch.allclose(full, exact, atol=1e-9)


def test_item_drift_splits_prompt_and_answer_positions():
    base = {"top_logp": torch.log(torch.tensor([[0.5, 0.5]] * 3)), "entropy": torch.tensor([1.0, 1.0, 1.0]),
            "argmax": torch.tensor([4, 5, 6]), "nll": torch.tensor([1.0, 2.0, 3.0])}
    tuned = {"top_logp": torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.25, 0.75]])),
             "entropy": torch.tensor([1.0, 0.4, 0.4]), "argmax": torch.tensor([4, 5, 7]),
             "nll": torch.tensor([1.0, 2.5, 2.0])}
    d = item_drift(base, tuned, n_prompt=2)  # row 0 predicts a prompt token; rows 1-2 answer tokens
    kl_row2 = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    assert d["kl_base_tuned_prompt"] == pytest.approx(0.0)
    assert d["kl_base_tuned_answer"] == pytest.approx(kl_row2 / 2)
    assert d["kl_base_tuned"] == pytest.approx(kl_row2 / 3)
    assert d["top1_agreement"] == pytest.approx(2 / 3)
    assert d["entropy_change"] == pytest.approx(-0.4)
    assert d["answer_nll_change"] == pytest.approx((0.5 - 1.0) / 2)


def _perturb(model, scale=0.2):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.add_(torch.randn_like(layer.mlp.down_proj.weight) * scale)


def test_drift_zero_for_identical_model_positive_after_change_and_cached(tokenizer, tmp_path, monkeypatch):
    from conftest import build_model

    base, tuned = build_model(len(tokenizer), seed=1), build_model(len(tokenizer), seed=1)
    kw = dict(source="gsm8k", limit=2, cache_dir=tmp_path, max_new_tokens=4, top_k=16)
    same = evaluate_drift(tuned, tokenizer, base, **kw)
    assert same["drift:gsm8k"]["score"] == 0.0 and same["drift:gsm8k:kl_tuned_base"]["score"] == 0.0
    assert same["drift:gsm8k:top1_agreement"]["score"] == 1.0
    assert len(list(tmp_path.glob("drift-*.pt"))) == 1 and len(list(tmp_path.glob("answers-*.pt"))) == 1

    _perturb(tuned)
    # Cache hit: the base answers are not generated again (generation would raise here).
    monkeypatch.setattr(answers_mod, "greedy", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    moved = evaluate_drift(tuned, tokenizer, base, out_dir=tmp_path / "out", **kw)
    assert moved["drift:gsm8k"]["score"] > 0 and moved["drift:gsm8k:kl_tuned_base"]["score"] > 0
    assert moved["drift:gsm8k"]["settings"]["base"] == same["drift:gsm8k"]["settings"]["base"]
    assert (tmp_path / "out" / "drift__gsm8k.json").is_file()


def test_peft_base_view_and_digest(tokenizer, tmp_path):
    from conftest import build_model
    from peft import LoraConfig, get_peft_model

    plain = build_model(len(tokenizer), seed=2)
    digest = weights_digest(plain)
    peft_model = get_peft_model(build_model(len(tokenizer), seed=2),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    assert weights_digest(peft_model) == digest  # adapters skipped: same cache key as the plain base
    kw = dict(source="gsm8k", limit=1, cache_dir=tmp_path, max_new_tokens=3, top_k=16)
    assert evaluate_drift(peft_model, tokenizer, None, **kw)["drift:gsm8k"]["score"] == 0.0  # B = 0 at init
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    assert evaluate_drift(peft_model, tokenizer, None, **kw)["drift:gsm8k"]["score"] > 0


def test_split_by_kind_by_hand():
    base = torch.tensor([0.1, 2.0, 0.5, 3.0])  # tau 2.5 -> log tau = 0.916: kept are 0.1 and 0.5
    tuned = torch.tensor([0.2, 1.0, 0.3, 2.0])
    d = split_by_kind(base, tuned, tau=2.5)
    assert (d["n_kept"], d["n_masked"], d["n_all"]) == (2, 2, 4)
    assert d["kept_base"] == pytest.approx(0.3) and d["kept_tuned"] == pytest.approx(0.25)
    assert d["masked_base"] == pytest.approx(2.5) and d["masked_tuned"] == pytest.approx(1.5)
    assert math.isnan(split_by_kind(base, tuned, tau=1.01)["kept_tuned"])  # no kept tokens


def test_heldout_zero_change_for_identical_model(tokenizer, tmp_path):
    from conftest import build_model

    base, tuned = build_model(len(tokenizer), seed=4), build_model(len(tokenizer), seed=4)
    records = evaluate_heldout(tuned, tokenizer, base, "mbpp-validation", limit=2, cache_dir=tmp_path, tau=400.0)
    assert set(records) == {f"heldout:mbpp-validation:{k}" for k in ("kept", "masked", "all")}
    everything = records["heldout:mbpp-validation:all"]
    assert everything["settings"]["change"] == pytest.approx(0.0, abs=1e-6)
    assert everything["score"] == pytest.approx(everything["settings"]["base_score"], abs=1e-6)
    assert 0 < everything["settings"]["masked_fraction"] < 1
    _perturb(tuned)
    moved = evaluate_heldout(tuned, tokenizer, base, "mbpp-validation", limit=2, cache_dir=tmp_path, tau=400.0)
    assert moved["heldout:mbpp-validation:all"]["settings"]["change"] != pytest.approx(0.0, abs=1e-4)


def test_nontarget_prompts_for_chat_and_raw_arc_records():
    from forgetless.retention.answers import prompt_set

    ids, messages, _ = prompt_set("arc_challenge-test", 2)
    assert ids == ["Mercury_7175875", "Mercury_SC_409171"]
    text = messages[0][0]["content"]
    assert messages[0][0]["role"] == "user" and "A. Planetary density will decrease." in text
    assert "D. Planetary gravity will become stronger." in text
    ids, messages, _ = prompt_set("gsm8k", 1)
    assert len(ids) == 1 and messages[0][-1]["role"] == "user"  # the gold answer is not in the prompt


def test_retention_base_cache_names_are_pinned(tmp_path):
    import torch

    from forgetless.retention.basecache import cache_path, ids_hash, load_cached, save_cached

    # The values from before basecache hashed through artifacts.json_digest: stored caches keep their names.
    assert cache_path("/c", "drift", {"b": 1, "a": [1, 2]}).name == "drift-3813f9409eb0095bf9c8.pt"
    assert ids_hash([[1, 2], [3]]) == "192f318fa6690229"
    path = tmp_path / "drift-x.pt"
    save_cached(path, {"k": 1}, {"x": torch.ones(2)})
    assert load_cached(path, {"k": 1})["x"].tolist() == [1.0, 1.0] and load_cached(path, {"k": 2}) is None
    assert [p.name for p in tmp_path.iterdir()] == ["drift-x.pt"]
