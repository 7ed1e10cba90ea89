"""Batches of token sequences: padding on either side, and length-sorted batches of a token budget.

Left padding is for generation (every sequence's new tokens start in one column); right padding
for teacher-forced scoring (position ``i`` of a row is token ``i`` of its sequence).
"""

from __future__ import annotations

import torch


def pad(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, attention_mask), both (B, T_max) long, padded with ``pad_id`` on the left or right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        start = width - len(seq) if left else 0
        ids[row, start:start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, start:start + len(seq)] = 1
    return ids, mask


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T_max), padded on the left.

    >>> left_pad([[5, 6], [7]], 0)[0].tolist()
    [[5, 6], [0, 7]]
    """
    return pad(sequences, pad_id, left=True)


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T_max), padded on the right (for teacher-forced scoring).

    >>> right_pad([[5, 6], [7]], 0)[0].tolist()
    [[5, 6], [7, 0]]
    """
    return pad(sequences, pad_id, left=False)


def length_buckets(lengths: list[int], batch_tokens: int, max_batch: int | None = None,
                   max_padding: float | None = None) -> list[list[int]]:
    """Group indices into batches of similar length with ``len(batch) * max_len <= batch_tokens``
    (at most ``max_batch`` each, and with ``max_padding`` at most that share of a batch's tokens padding).

    Sorting by length (longest first, so an out-of-memory shows up on the first batch) keeps
    padding small. An example longer than ``batch_tokens`` gets a batch of its own. On a CPU a
    padded token costs as much as a real one and a bigger batch buys little, so scoring caps the
    padding (:data:`forgetless.lm.scoring.MAX_PADDING`) rather than filling the token budget.

    >>> length_buckets([3, 10, 5, 4], batch_tokens=12)
    [[1], [2, 3], [0]]
    >>> length_buckets([10, 9, 6, 6], batch_tokens=40, max_padding=0.1)  # 10+9 pads 1 of 20; +6 would pad 9 of 30
    [[0, 1], [2, 3]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    real = 0  # tokens of the last batch that are not padding
    for i in order:
        last = batches[-1] if batches else None
        if last:
            size = (len(last) + 1) * lengths[last[0]]  # the batch's tokens, padding included, with i in it
            fits = size <= batch_tokens and (max_batch is None or len(last) < max_batch)
            if fits and (max_padding is None or size - real - lengths[i] <= max_padding * size):
                last.append(i)
                real += lengths[i]
                continue
        batches.append([i])
        real = lengths[i]
    return batches
