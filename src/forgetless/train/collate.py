"""Training tables (one row per example, masks already applied) and the collators that batch them (padded, or
padding-free).

A training table has the columns ``id`` (str), ``input_ids`` (list<int>), ``response_mask`` (list<int>, 1 =
response token), ``labels`` (list<int>: the token id where it is trained, -100 elsewhere), ``loss_weight``
(list<float>: 0.0 where not trained, in (0, 1] where trained) and optionally ``nll`` (list<float>, NaN where
unscored). The masking stage writes it as Parquet; :func:`build_sft_table` builds one straight from conversations
(every response token trained) so plain SFT needs no scoring.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

from forgetless.core.errors import ForgetlessError
from forgetless.core.labels import IGNORE_INDEX
from forgetless.lm import artifacts
from forgetless.core.packing import flatten, restart_positions
from forgetless.lm.templates import encode_conversation

COLUMNS = ("id", "input_ids", "response_mask", "labels", "loss_weight")


class TableError(ForgetlessError, ValueError):
    """A training table is malformed; the message names the row."""


def build_sft_table(examples: Iterable, tokenizer, max_length: int | None = None) -> list[dict]:
    """Rows of a training table that train every response token (weight 1.0); ``nll`` is all NaN."""
    rows = []
    for ex in examples:
        enc = encode_conversation(tokenizer, ex.messages, max_length)
        labels = [t if m else IGNORE_INDEX for t, m in zip(enc.input_ids, enc.response_mask)]
        labels[0] = IGNORE_INDEX  # position 0 has no context: never trained (see forgetless.core.logits)
        rows.append({
            "id": str(ex.id), "input_ids": list(enc.input_ids), "response_mask": list(enc.response_mask),
            "labels": labels, "loss_weight": [0.0 if y == IGNORE_INDEX else 1.0 for y in labels],
            "nll": [math.nan] * len(enc.input_ids),
        })
    return rows


def check_row(row: dict, index: int) -> None:
    """Raise :class:`TableError` unless the row's lists line up and labels agree with input_ids/weights."""
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise TableError(f"row {index} ({row.get('id')}): missing columns {missing}")
    n = len(row["input_ids"])
    if any(len(row[c]) != n for c in COLUMNS[2:]):
        raise TableError(f"row {index} ({row['id']}): input_ids, response_mask, labels, loss_weight differ in length")
    for i, (tok, y, w) in enumerate(zip(row["input_ids"], row["labels"], row["loss_weight"])):
        if y != IGNORE_INDEX and (y != tok or not 0.0 < w <= 1.0):
            raise TableError(f"row {index} ({row['id']}), token {i}: a trained label must equal input_ids and "
                             f"have loss_weight in (0, 1]; got label {y}, token {tok}, weight {w}")
        if y == IGNORE_INDEX and w != 0.0:
            raise TableError(f"row {index} ({row['id']}), token {i}: loss_weight {w} on an untrained token")


def write_table(rows: list[dict], path: str | Path) -> Path:
    """Write rows as Parquet (atomically: :func:`forgetless.lm.artifacts.write_parquet`)."""
    import pyarrow as pa

    artifacts.write_parquet(Path(path), pa.Table.from_pylist(rows))
    return Path(path)


def read_table(path: str | Path) -> list[dict]:
    """Rows of a training table, checked with :func:`check_row`."""
    rows = artifacts.read_parquet(path).to_pylist()
    if not rows:
        raise TableError(f"{path}: the training table is empty")
    for i, row in enumerate(rows):
        check_row(row, i)
    return rows


def table_counts(rows: list[dict]) -> dict:
    """Trained-token counts of a table: response tokens, trained tokens, masked fraction, empty examples."""
    response = sum(sum(r["response_mask"]) for r in rows)
    trained = sum(sum(1 for y in r["labels"][1:] if y != IGNORE_INDEX) for r in rows)
    weight = sum(sum(r["loss_weight"][1:]) for r in rows)
    return {
        "examples": len(rows), "response_tokens": response, "trained_tokens": trained,
        "trained_weight": weight, "masked_fraction": (1 - trained / response) if response else 0.0,
        "examples_without_trained_tokens": sum(1 for r in rows if all(y == IGNORE_INDEX for y in r["labels"][1:])),
    }


class MaskedBatchCollator:
    """Right-pads ``input_ids`` (pad id), ``attention_mask`` (0), ``labels`` (-100) and ``loss_weight`` (0.0).

    Works in any HF Trainer / TRL SFTTrainer; examples without ``loss_weight`` get 1.0 where labelled. With
    ``keep_nll`` the per-token ``nll`` column comes along too (padded with NaN), for masks made on the fly with
    :func:`forgetless.core.masking.stm_labels` (pop it before the model's forward). Other columns are dropped.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, keep_nll: bool = False):
        self.pad_token_id, self.pad_to_multiple_of, self.keep_nll = pad_token_id, pad_to_multiple_of, keep_nll

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(examples), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
            "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
            "loss_weight": torch.zeros((len(examples), length), dtype=torch.float32),
        }
        for b, e in enumerate(examples):
            n = len(e["input_ids"])
            labels = torch.as_tensor(list(e.get("labels", e["input_ids"])), dtype=torch.long)
            batch["input_ids"][b, :n] = torch.as_tensor(list(e["input_ids"]), dtype=torch.long)
            batch["attention_mask"][b, :n] = 1
            batch["labels"][b, :n] = labels
            if e.get("loss_weight") is not None:
                batch["loss_weight"][b, :n] = torch.as_tensor(list(e["loss_weight"]), dtype=torch.float32)
            else:
                batch["loss_weight"][b, :n] = (labels != IGNORE_INDEX).float()
        if self.keep_nll:
            batch["nll"] = torch.full((len(examples), length), math.nan, dtype=torch.float32)
            for b, e in enumerate(examples):
                batch["nll"][b, :len(e["nll"])] = torch.as_tensor([math.nan if v is None else v for v in e["nll"]])
        # Position 0 is never predicted; clearing it keeps the Trainer's token count equal to ours for any model.
        batch["labels"][:, 0] = IGNORE_INDEX
        batch["loss_weight"][:, 0] = 0.0
        return batch


class FlatBatchCollator:
    """Padding-free batches: the examples laid end to end in one row (:mod:`forgetless.core.packing`).

    Returns ``input_ids``, ``position_ids`` (restarting at 0 per example), ``labels`` and ``loss_weight``, each
    ``(1, N)`` with ``N`` the examples' total length, and no ``attention_mask``. The first token of every example
    gets label -100 and weight 0.0: row ``i - 1`` predicts token ``i``, and the row before an example's first token
    is the previous example's last. The trained tokens, their weights and so the loss and its normalisation are
    those of :class:`MaskedBatchCollator`'s padded batch of the same examples.
    """

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        labels, weights = [], []
        for e in examples:
            y = [IGNORE_INDEX, *list(e.get("labels", e["input_ids"]))[1:]]
            w = (list(e["loss_weight"])[1:] if e.get("loss_weight") is not None
                 else [float(t != IGNORE_INDEX) for t in y[1:]])
            labels.append(y)
            weights.append([0.0, *w])
        return {"input_ids": flatten([e["input_ids"] for e in examples]),
                "position_ids": restart_positions([len(e["input_ids"]) for e in examples]),
                "labels": flatten(labels), "loss_weight": flatten(weights, torch.float32)}
