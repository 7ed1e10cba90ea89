"""forgetless masks in the user's own TRL SFTTrainer / HF Trainer (docs/own-trainer.md), a step or two each."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import build_model, conversations, drop_every
from forgetless.train.collate import MaskedBatchCollator, build_sft_table
from forgetless.train.loss import MaskedLossMixin, compute_masked_loss

# TRL is the optional extra [trl]: the tests of the TRL recipes skip without it.
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (extra [trl])")


def model_for(tokenizer):
    # Large initial weights: per-token losses differ, so dropping tokens visibly changes the mean loss.
    return build_model(len(tokenizer), initializer_range=0.5)


def stm_like_rows(tokenizer, n=4):
    return drop_every(build_sft_table(conversations(n), tokenizer), 3)


def sft_config(tmp_path, **kw):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
                     report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", **kw)


def first_loss(trainer) -> float:
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


def expected_loss(tokenizer, rows, weighted=False):
    model = model_for(tokenizer)
    batch = MaskedBatchCollator(tokenizer.pad_token_id)(rows)
    if not weighted:
        batch.pop("loss_weight")
    with torch.no_grad():
        return compute_masked_loss(model, batch)[0].item()


@needs_trl
def test_plain_sft_trainer_trains_the_labels_column_as_is(tmp_path, tokenizer):
    """Hard masks need no forgetless code: TRL 1.16 keeps a pre-built `labels` column (-100 = not trained)."""
    from datasets import Dataset
    from trl import SFTTrainer

    rows = stm_like_rows(tokenizer)
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    trainer = SFTTrainer(model=model_for(tokenizer), args=sft_config(tmp_path), train_dataset=dataset,
                         processing_class=tokenizer)
    trainer.train()
    assert first_loss(trainer) == pytest.approx(expected_loss(tokenizer, rows), rel=1e-4)
    # the same table with every response token trained gives a different loss: the mask was honoured
    assert expected_loss(tokenizer, build_sft_table(conversations(4), tokenizer)) != pytest.approx(
        first_loss(trainer), rel=1e-3)


@needs_trl
def test_mixin_with_sft_trainer_uses_soft_weights(tmp_path, tokenizer):
    from datasets import Dataset
    from trl import SFTTrainer

    class ForgetlessSFTTrainer(MaskedLossMixin, SFTTrainer):
        pass

    rows = stm_like_rows(tokenizer)
    for r in rows:
        r["loss_weight"] = [0.25 if w else 0.0 for w in r["loss_weight"]]
    dataset = Dataset.from_list([{k: r[k] for k in ("input_ids", "labels", "loss_weight")} for r in rows])
    trainer = ForgetlessSFTTrainer(
        model=model_for(tokenizer), train_dataset=dataset, processing_class=tokenizer,
        args=sft_config(tmp_path, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}),
        data_collator=MaskedBatchCollator(tokenizer.pad_token_id),
    )
    trainer.train()
    loss = first_loss(trainer)
    assert loss == pytest.approx(expected_loss(tokenizer, rows, weighted=True), rel=1e-4)
    assert loss == pytest.approx(0.25 * expected_loss(tokenizer, rows), rel=1e-4)


def test_plain_hf_trainer_with_collator(tmp_path, tokenizer):
    from transformers import Trainer, TrainingArguments

    rows = stm_like_rows(tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, report_to=[], use_cpu=True, logging_steps=1,
                             save_strategy="no", remove_unused_columns=False)
    collate = MaskedBatchCollator(tokenizer.pad_token_id)
    trainer = Trainer(model=model_for(tokenizer), args=args, train_dataset=rows,
                      data_collator=lambda ex: {k: v for k, v in collate(ex).items() if k != "loss_weight"})
    trainer.train()
    assert first_loss(trainer) == pytest.approx(expected_loss(tokenizer, rows), rel=1e-4)


@needs_trl
def test_mixin_with_trl_padding_free(tmp_path, tokenizer):
    """TRL's padding_free batches (one row, position_ids restarting, no attention_mask) give the padded loss."""
    from datasets import Dataset
    from trl import SFTTrainer

    class ForgetlessSFTTrainer(MaskedLossMixin, SFTTrainer):
        pass

    rows = stm_like_rows(tokenizer)
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    seen = []
    trainer = ForgetlessSFTTrainer(model=model_for(tokenizer), processing_class=tokenizer, train_dataset=dataset,
                                   args=sft_config(tmp_path, padding_free=True, max_length=None))
    collate = trainer.data_collator
    trainer.data_collator = lambda ex: seen.append(collate(ex)) or seen[-1]
    trainer.train()
    assert seen[0]["input_ids"].shape[0] == 1 and "attention_mask" not in seen[0]  # it was padding-free
    assert first_loss(trainer) == pytest.approx(expected_loss(tokenizer, rows), rel=1e-4)


@needs_trl
def test_mixin_with_flat_collator_keeps_soft_weights(tmp_path, tokenizer):
    from datasets import Dataset
    from trl import SFTTrainer

    from forgetless.train.collate import FlatBatchCollator

    class ForgetlessSFTTrainer(MaskedLossMixin, SFTTrainer):
        pass

    rows = stm_like_rows(tokenizer)
    for r in rows:
        r["loss_weight"] = [0.25 if w else 0.0 for w in r["loss_weight"]]
    dataset = Dataset.from_list([{k: r[k] for k in ("input_ids", "labels", "loss_weight")} for r in rows])
    trainer = ForgetlessSFTTrainer(
        model=model_for(tokenizer), train_dataset=dataset, processing_class=tokenizer,
        args=sft_config(tmp_path, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}),
        data_collator=FlatBatchCollator(),
    )
    trainer.train()
    assert first_loss(trainer) == pytest.approx(0.25 * expected_loss(tokenizer, rows), rel=1e-4)
