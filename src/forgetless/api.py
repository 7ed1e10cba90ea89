"""The library API for your own training loop: your data in, a ``datasets.Dataset`` out of each step.

    table = build_sft_table(records, tokenizer)                  # input_ids, response_mask, labels, loss_weight, nll
    table = score_dataset(model, tokenizer, table)               # nll: each token's NLL under the model in memory
    table = mask_dataset(table, policy="threshold", tau=2.5)     # labels / loss_weight of STM at τ = 2.5

The columns are those of the masking stage's Parquet table (:mod:`forgetless.train.collate`), so a table made here
trains with ``forgetless train`` too, and one read from ``masks/<policy>/data.parquet`` masks again here.
``nll[i]`` scores token ``i`` (predicted from row ``i - 1``; NaN where not a response token, and at position 0):
the alignment :func:`forgetless.core.masking.stm_labels` expects.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.core.errors import ConfigError
from forgetless.core.masking import PAPER_TAU, POLICIES, REFERENCE_POLICIES
from forgetless.lm.data import DataError, Example, load_examples, normalize_record

logger = logging.getLogger(__name__)


def to_examples(data: Any) -> list[Example]:
    """Conversations from what a user has at hand: a data source the CLI reads (bundled name, JSONL/JSON file,
    saved dataset directory, ``hf:<name>``), a ``datasets.Dataset``, or an iterable of records (``messages``,
    ``conversations`` or ``prompt``+``response`` dicts), of bare conversations (lists of ``{"role", "content"}``)
    or of :class:`forgetless.lm.data.Example`."""
    if isinstance(data, (str, Path)):
        return load_examples(str(data))
    examples = []
    for i, record in enumerate(data):
        if isinstance(record, Example):
            examples.append(record)
            continue
        if isinstance(record, list):  # one conversation as a list of turns
            record = {"messages": record}
        if not isinstance(record, dict):
            raise DataError(f"example {i}: expected a record (dict), a list of turns or an Example, "
                            f"got {type(record).__name__}")
        example_id = str(record.get("id", record.get("task_id", i)))
        messages = normalize_record(record, f"example {i} (id {example_id})")
        examples.append(Example(id=example_id, messages=messages))
    if not examples:
        raise DataError("the data set is empty")
    return examples


def build_sft_table(data: Any, tokenizer, max_length: int | None = None):
    """A ``datasets.Dataset`` training every response token (weight 1.0; ``nll`` all NaN until scored): one row
    per conversation of ``data`` (anything :func:`to_examples` takes), encoded with the tokenizer's chat template."""
    from datasets import Dataset

    from forgetless.train.collate import build_sft_table as sft_rows

    return Dataset.from_list(sft_rows(to_examples(data), tokenizer, max_length))


def score_dataset(model, tokenizer, dataset, batch_tokens: int = 8192):
    """``dataset`` with ``nll`` replaced by each token's NLL under ``model`` (float32; NaN outside the response).

    ``dataset`` holds ``input_ids`` and ``response_mask`` (a :func:`build_sft_table` table), or is anything
    :func:`build_sft_table` takes. The model is scored where it lies, in eval mode, without gradients; its training
    mode is restored after.
    """
    import torch
    from datasets import Dataset

    from forgetless.lm.scoring import score_encoded
    from forgetless.lm.templates import Encoded

    if not isinstance(dataset, Dataset) or "response_mask" not in dataset.column_names:
        dataset = build_sft_table(dataset, tokenizer)
    encoded = [Encoded(list(ids), list(mask)) for ids, mask in zip(dataset["input_ids"], dataset["response_mask"])]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            nlls = score_encoded(model, encoded, tokenizer.pad_token_id, batch_tokens, shared=False)
    finally:
        model.train(was_training)
    if "nll" in dataset.column_names:
        dataset = dataset.remove_columns("nll")
    return dataset.add_column("nll", [n.astype(np.float32).tolist() for n in nlls])


def mask_dataset(dataset, policy: str = "threshold", *, tau: float = PAPER_TAU, fraction: float | None = None,
                 seed: int = 0, per_example: bool = False):
    """``dataset`` (scored: ``input_ids``, ``response_mask``, ``nll``) with ``labels``, ``loss_weight`` and
    ``masked_fraction`` set by ``policy`` (:mod:`forgetless.core.masking`: ``threshold`` is STM at ``tau``;
    ``auto-tau`` and ``fraction`` take ``fraction``; ``random``/``inverse`` match ``tau``'s count; ``none`` trains
    every response token; ``inverse-ppl`` is a soft weight). The resolved settings (e.g. the τ ``auto-tau`` chose)
    and the masked share are logged."""
    import pyarrow as pa

    from forgetless.core.masking import weights_for_policy
    from forgetless.mask.stage import apply_weights, flatten_response_nll

    if policy in REFERENCE_POLICIES or policy not in POLICIES:
        raise ConfigError(f"mask_dataset takes one of {', '.join(p for p in POLICIES if p not in REFERENCE_POLICIES)}; "
                         f"got {policy!r} (reference policies need a second scoring: use `forgetless mask`)")
    missing = {"input_ids", "response_mask", "nll"} - set(dataset.column_names)
    if missing:
        raise ConfigError(f"mask_dataset needs a scored table; missing columns {sorted(missing)} "
                          "(score_dataset adds nll)")
    table = pa.table({c: dataset[c] for c in ("input_ids", "response_mask", "nll")})
    nll, sizes, positions = flatten_response_nll(table)
    weights, info = weights_for_policy(nll, policy, tau=tau, fraction=fraction, seed=seed,
                                       sizes=sizes if per_example else None)
    masked, stats = apply_weights(table, weights, sizes, positions)
    logger.info("%s: masked %.1f%% of %d response tokens %s", policy, 100 * stats["masked_fraction"],
                stats["response_tokens"], {k: v for k, v in info.items() if k != "policy"})
    new = {c: masked.column(c).to_pylist() for c in ("labels", "loss_weight", "masked_fraction")}
    dataset = dataset.remove_columns([c for c in new if c in dataset.column_names])
    for name, values in new.items():
        dataset = dataset.add_column(name, values)
    return dataset

