"""Trainer options passed through to transformers, and padding-free training and scoring.

Padding-free batches must give the padded batch's loss, gradients and NLLs, with the same trained-token count and
soft weights, and never predict an example's first token from the example before it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_model, train_config
from forgetless.config import ConfigError, load_config
from forgetless.core.packing import flatten, packing_isolates, restart_positions
from forgetless.lm.templates import Encoded
from forgetless.core.labels import IGNORE_INDEX as IGNORE
from forgetless.train.collate import FlatBatchCollator, MaskedBatchCollator
from forgetless.train.loss import compute_masked_loss

# Two examples of unequal length; soft weights; the second has a label at position 0, which no collator may train.
EXAMPLES = [
    {"input_ids": [10, 11, 12, 13, 14], "labels": [IGNORE, IGNORE, 12, 13, 14],
     "loss_weight": [0.0, 0.0, 1.0, 0.5, 0.25]},
    {"input_ids": [20, 21, 22], "labels": [20, 21, 22], "loss_weight": [1.0, 1.0, 0.75]},
    {"input_ids": [30, 31, 32, 33], "labels": [IGNORE, 31, IGNORE, 33]},  # no loss_weight: 1.0 where labelled
]


@pytest.fixture(scope="module")
def leaky_attention():
    """An attention implementation that ignores packing: plain causal attention over the whole row."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("forgetless_test_leaky", causal_only)
    return "forgetless_test_leaky"


def test_flat_collator_hand_checked():
    batch = FlatBatchCollator()(EXAMPLES)
    assert set(batch) == {"input_ids", "position_ids", "labels", "loss_weight"}  # no attention_mask
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14, 20, 21, 22, 30, 31, 32, 33]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    # Each example's first token: label -100, weight 0 (label 20 at the second example's position 0 is dropped).
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 12, 13, 14, IGNORE, 21, 22, IGNORE, 31, IGNORE, 33]]
    assert batch["loss_weight"].tolist() == [[0.0, 0.0, 1.0, 0.5, 0.25, 0.0, 1.0, 0.75, 0.0, 1.0, 0.0, 1.0]]
    padded = MaskedBatchCollator(0)(EXAMPLES)
    # The Trainer's count (labels[..., 1:] != -100) and the summed weights are those of the padded batch: 7, 5.5.
    for b in (batch, padded):
        assert int((b["labels"][..., 1:] != IGNORE).sum()) == 7
        assert float(b["loss_weight"].sum()) == 5.5


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_loss_and_gradients_equal_padded(attention):
    torch.manual_seed(0)
    model = build_model(64, seed=1).train()  # dropout is 0 in the tiny config
    model.set_attn_implementation(attention)
    reference = build_model(64, seed=2)  # KL to another model: base rows must line up too
    padded, flat = MaskedBatchCollator(0)(EXAMPLES), FlatBatchCollator()(EXAMPLES)
    num_items = 7  # trained tokens of the step (see the collator test)

    def loss_and_grads(batch, kl_coef):
        model.zero_grad()
        loss, stats = compute_masked_loss(model, batch, num_items, kl_coef, reference if kl_coef else None)
        loss.backward()
        return loss.detach(), stats, [p.grad.clone() for p in model.parameters()]

    for kl_coef in (0.0, 0.3):
        loss_p, stats_p, grads_p = loss_and_grads(padded, kl_coef)
        loss_f, stats_f, grads_f = loss_and_grads(flat, kl_coef)
        assert int(stats_f["trained_tokens"]) == int(stats_p["trained_tokens"]) == 7
        assert torch.allclose(loss_f, loss_p, atol=1e-5, rtol=0)
        assert torch.allclose(stats_f["nll_sum"], stats_p["nll_sum"], atol=1e-5, rtol=0)
        for gp, gf in zip(grads_p, grads_f):
            assert torch.allclose(gf, gp, atol=1e-5, rtol=1e-4)
    # The NLL part against each example scored alone with the model's full logits: sum(weight * nll) / 7.
    with torch.no_grad():
        expected = 0.0
        for e in EXAMPLES:
            logp = torch.log_softmax(model(input_ids=torch.tensor([e["input_ids"]])).logits[0].float(), dim=-1)
            weights = e.get("loss_weight") or [float(y != IGNORE) for y in e["labels"]]
            expected += sum(weights[i] * -logp[i - 1, e["labels"][i]] for i in range(1, len(e["labels"]))
                            if e["labels"][i] != IGNORE)
        loss_nll, _ = compute_masked_loss(model, flat, num_items)
    assert abs(float(loss_nll) - float(expected) / 7) < 1e-5


def test_a_label_at_a_seam_is_never_trained():
    """A batch whose collator left a label on an example's first token (position_ids == 0) does not train it."""
    model = build_model(64, seed=1)
    flat = FlatBatchCollator()(EXAMPLES)
    dirty = dict(flat, labels=flat["labels"].clone(), loss_weight=flat["loss_weight"].clone())
    dirty["labels"][0, 5], dirty["loss_weight"][0, 5] = 20, 1.0  # the second example's first token
    with torch.no_grad():
        clean_loss, clean_stats = compute_masked_loss(model, flat, 7)
        dirty_loss, dirty_stats = compute_masked_loss(model, dirty, 7)
    assert int(dirty_stats["trained_tokens"]) == int(clean_stats["trained_tokens"]) == 7
    assert float(dirty_loss) == pytest.approx(float(clean_loss), abs=1e-6)


def test_packing_check(leaky_attention):
    model = build_model(64)
    assert packing_isolates(model)  # sdpa, transformers' default
    model.set_attn_implementation("eager")
    assert packing_isolates(model)
    model.set_attn_implementation(leaky_attention)
    assert not packing_isolates(model)


def test_token_nll_alignment_at_the_seam():
    """In a padding-free row the first token of an example is NaN even where scored; the second is scored from the
    example's own first row, which sits right after the previous example's last token."""
    from forgetless.core.logits import token_nll

    model = build_model(64, seed=3)
    first, second = [5, 6, 7], [8, 9, 10, 11]
    ids, positions = flatten([first, second]), restart_positions([3, 4])
    with torch.no_grad():
        nll = token_nll(model, ids, None, torch.ones_like(ids), positions)[0]
        alone = torch.log_softmax(model(input_ids=torch.tensor([second])).logits[0].float(), dim=-1)
    assert math.isnan(nll[0]) and math.isnan(nll[3])  # each example's position 0
    for i in range(1, 4):  # token i of the second example from row i - 1 of the second example alone
        assert float(nll[3 + i]) == pytest.approx(float(-alone[i - 1, second[i]]), abs=1e-5)


def test_padding_free_scoring_equals_padded(tokenizer, leaky_attention, caplog):
    from forgetless.lm.scoring import score_batch, score_encoded

    model = build_model(len(tokenizer), seed=4)
    encoded = [Encoded(list(range(40, 40 + n)), [0] * (n // 2) + [1] * (n - n // 2)) for n in (9, 5, 12, 7, 3)]
    encoded.append(Encoded([50, 51, 52, 53], [1, 1, 1, 1]))  # a response token at position 0: never scored
    padded = score_encoded(model, encoded, tokenizer.pad_token_id, batch_tokens=30)
    # Packed rows themselves (score_encoded packs only under a varlen kernel: under sdpa it scores padded).
    rows = score_batch(model, encoded, list(range(len(encoded))), tokenizer.pad_token_id, padding_free=True)
    flat = [rows[i] for i in range(len(encoded))]
    for p, f, e in zip(padded, flat, encoded):
        assert p.shape == f.shape == (len(e),)
        assert ((p != p) == (f != f)).all()  # NaN at the same places: off the response, and position 0
        assert abs(p[p == p] - f[f == f]).max() < 1e-5
    assert math.isnan(flat[-1][0]) and not math.isnan(flat[-1][1])
    # Attention that lets packed examples see each other: the padded path instead, with a warning.
    model.set_attn_implementation(leaky_attention)
    fallback = score_encoded(model, encoded, tokenizer.pad_token_id, batch_tokens=30, padding_free=True)
    assert "does not keep packed sequences apart" in caplog.text
    model.set_attn_implementation("sdpa")
    for p, f in zip(padded, fallback):
        assert abs(p[p == p] - f[f == f]).max() < 1e-5


def _losses(out):
    return [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]


def test_run_train_padding_free_matches_padded(train_world):
    from transformers import TrainerCallback

    from forgetless.train.stage import run_train

    seen = {}

    class Attention(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["attention"] = model.config._attn_implementation

    padded = run_train(train_config(train_world, "pf-padded", table="stm", batch_size=3, max_steps=2))
    flat = run_train(train_config(train_world, "pf-flat", table="stm", batch_size=3, max_steps=2, padding_free=True,
                                  attn_implementation="eager"), callbacks=[Attention()])
    assert seen["attention"] == "eager"
    for a, b in zip(_losses(padded), _losses(flat), strict=True):
        assert a["trained_tokens"] == b["trained_tokens"] > 0
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert json.loads((flat / "config.json").read_text())["padding_free"] is True


def test_run_train_refuses_padding_free_with_leaky_attention(train_world, leaky_attention):
    from forgetless.train.stage import run_train

    with pytest.raises(ValueError, match="padding_free needs attention that keeps packed examples apart"):
        run_train(train_config(train_world, "pf-leaky", padding_free=True, attn_implementation=leaky_attention))


def test_attn_implementation_errors_in_one_line(tiny_model_dir):
    from forgetless.lm.modeling import ModelLoadError, load_model

    assert load_model(str(tiny_model_dir), device="cpu",
                      attn_implementation="eager").config._attn_implementation == "eager"
    with pytest.raises(ModelLoadError, match="attn_implementation='bogus' cannot be used") as info:
        load_model(str(tiny_model_dir), device="cpu", attn_implementation="bogus")
    assert "\n" not in str(info.value)


def test_pass_through_arguments(train_world, tmp_path):
    from forgetless.train.stage import training_arguments

    config = train_config(train_world, "args", report_to=("tensorboard", "wandb"), push_to_hub=True,
                          hub_model_id="me/stm-run", use_liger_kernel=True)
    args = training_arguments(config, tmp_path / "stm-run", "cpu", torch.float32)
    assert args.report_to == ["tensorboard", "wandb"]
    assert args.hub_model_id == "me/stm-run" and not args.push_to_hub  # pushed once, at the end
    assert args.use_liger_kernel and args.liger_kernel_config == {"fused_linear_cross_entropy": False,
                                                                  "cross_entropy": False}
    assert args.run_name == "stm-run" and not args.torch_compile
    plain = training_arguments(train_config(train_world, "args"), tmp_path / "x", "cpu", torch.float32)
    assert plain.report_to == [] and not plain.use_liger_kernel and plain.hub_model_id is None


def test_pass_through_config_checks(train_world):
    from forgetless.train.stage import TrainConfig

    assert load_config(TrainConfig, overrides=["data=t", "output_dir=o", "report_to=wandb"]).report_to == ("wandb",)
    assert load_config(TrainConfig, overrides=["data=t", "output_dir=o", "report_to=[wandb,tensorboard]"]
                       ).report_to == ("wandb", "tensorboard")
    with pytest.raises(ConfigError, match="push_to_hub and hub_model_id go together"):
        load_config(TrainConfig, overrides=["data=t", "output_dir=o", "push_to_hub=true"])
    with pytest.raises(ConfigError, match="report_to 'none' cannot be combined"):
        load_config(TrainConfig, overrides=["data=t", "output_dir=o", "report_to=[none,wandb]"])


def test_missing_packages_fail_before_the_model_loads(train_world, monkeypatch):
    import importlib.util

    import transformers.integrations

    from forgetless.train import passthrough

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(passthrough.importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"needs the package 'liger_kernel' \(pip install liger-kernel\)"):
        passthrough.check_options(train_config(train_world, "x", use_liger_kernel=True), "cuda")
    monkeypatch.setattr(passthrough.importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(ValueError, match="use_liger_kernel needs a CUDA device"):
        passthrough.check_options(train_config(train_world, "x", use_liger_kernel=True), "cpu")
    monkeypatch.setattr(transformers.integrations, "is_wandb_available", lambda: False)
    with pytest.raises(ValueError, match=r"report_to=wandb needs the package 'wandb' \(pip install wandb\)"):
        passthrough.check_options(train_config(train_world, "x", report_to=("wandb",)), "cpu")
    with pytest.raises(ValueError, match="bogus is not supported"):
        passthrough.check_options(train_config(train_world, "x", report_to=("bogus",)), "cpu")
    passthrough.check_options(train_config(train_world, "x"), "cpu")  # the defaults need nothing


def test_push_to_hub_once_after_the_final_save(train_world, monkeypatch):
    from transformers import Trainer

    from forgetless.train.passthrough import PushError
    from forgetless.train.stage import run_train

    calls = []

    def fake_push(self, commit_message=None, **kwargs):
        out = train_world.root / "push"
        calls.append({"adapter": (out / "adapter" / "adapter_config.json").is_file(),
                      "manifest": (out / "manifest.json").is_file(), "repo": self.args.hub_model_id,
                      "tokenizer": (out / "checkpoints" / "tokenizer_config.json").is_file(),
                      "message": commit_message})

    monkeypatch.setattr(Trainer, "push_to_hub", fake_push)
    run_train(train_config(train_world, "push", push_to_hub=True, hub_model_id="me/stm-run", method="stm"))
    assert calls == [{"adapter": True, "manifest": True, "repo": "me/stm-run", "tokenizer": True,
                      "message": "forgetless stm (lora)"}]

    def failing_push(self, **kwargs):
        raise OSError("offline\nsecond line")

    monkeypatch.setattr(Trainer, "push_to_hub", failing_push)
    with pytest.raises(PushError, match=r"push to me/x failed \(OSError: offline\); the run in .* is complete"):
        run_train(train_config(train_world, "push-fails", push_to_hub=True, hub_model_id="me/x"))
    assert (train_world.root / "push-fails" / "manifest.json").is_file()


def test_torch_compile_trains_the_same_loss(train_world, monkeypatch):
    """The masked loss (a hook on the decoder, the LM head on picked rows) under the Trainer's torch.compile.

    Dynamo's ``eager`` backend traces the same graphs as inductor without generating code (inductor takes minutes on
    2 CPU cores; it was run by hand: the same losses)."""
    from torch._dynamo.utils import counters

    from forgetless.train import stage

    make_args = stage.training_arguments

    def eager_backend(*args, **kwargs):
        made = make_args(*args, **kwargs)
        assert made.torch_compile and made.torch_compile_backend == "inductor"  # passed through
        made.torch_compile_backend = "eager"
        return made

    plain = stage.run_train(train_config(train_world, "compile-off"))
    monkeypatch.setattr(stage, "training_arguments", eager_backend)
    counters.clear()
    compiled = stage.run_train(train_config(train_world, "compile-on", torch_compile=True))
    assert counters["stats"]["unique_graphs"] > 0  # dynamo traced the model
    for a, b in zip(_losses(plain), _losses(compiled), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and a["trained_tokens"] == b["trained_tokens"]
