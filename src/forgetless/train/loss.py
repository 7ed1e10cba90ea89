"""The masked training loss, and the few lines that plug it into a Hugging Face Trainer.

Normalisation (the one place it is written down)::

    loss = sum_{trained tokens i in the micro-batch} loss_weight_i * nll_i  [+ kl_coef * loss_weight_i * kl_i]
           ---------------------------------------------------------------------------------------------------
             number of trained tokens (labels != -100) in the WHOLE gradient-accumulation step (all micro-batches,
             all devices)

* A token is *trained* when its label is not -100; ``loss_weight`` is 1.0 for hard masks and in (0, 1] for soft
  policies, 0.0 exactly where the label is -100. The denominator counts trained tokens, not their weights, so a
  soft policy lowers the effective learning rate on uncertain tokens instead of re-normalising it away.
* ``nll_i = -log p(labels[i] | input_ids[:i])`` comes from the hidden state at ``i - 1`` (the alignment of
  :mod:`forgetless.core.logits`); position 0 is never trained.
* Because every micro-batch divides by the same step-wide count, the summed micro-batch losses equal the loss of
  one big batch: batch 1 x 4 accumulation gives the gradients of batch 4 x 1.
* An example, a micro-batch or a whole step with no trained token adds 0 to the numerator; the denominator is
  clamped to at least 1, so the loss is 0, never NaN.
* ``kl_i = KL(p_tuned || p_base)`` of the next-token distributions at the rows that predict trained tokens; it is
  zero when the model equals the base and its gradient pulls the tuned distribution back toward the base.

The Hugging Face Trainer supplies the step-wide count as ``num_items_in_batch`` (it counts ``labels[..., 1:] !=
-100``); :class:`MaskedLossMixin` makes sure it is counted and uses it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from forgetless.core.logits import chunk_rows, head_logits, split_causal_lm, target_nll

IGNORE = -100


def trained_rows(labels: torch.Tensor) -> torch.Tensor:
    """Which hidden rows predict a trained token: ``(B, T) -> (B, T-1)`` bool; row ``i-1`` predicts label ``i``."""
    return labels[:, 1:] != IGNORE


def masked_loss(nll: torch.Tensor, weight: torch.Tensor, num_items: torch.Tensor | int | float) -> torch.Tensor:
    """``sum(weight * nll) / max(num_items, 1)`` for the trained rows ``(N,), (N,)``; 0 when there are none.

    >>> masked_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.5]), 4)
    tensor(0.6250)
    """
    if torch.is_tensor(num_items):
        denominator = num_items.to(nll.device, torch.float32).clamp(min=1.0)
    else:
        denominator = max(float(num_items), 1.0)
    return (weight.float() * nll.float()).sum() / denominator


def rows_kl(tuned_logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_tuned || p_base)`` per row: ``(N, V), (N, V) -> (N,)`` in nats, >= 0, 0 iff the rows are equal.

    Gradients flow only into ``tuned_logits``: the base distribution is the fixed anchor.
    """
    log_p = F.log_softmax(tuned_logits.float(), dim=-1)
    log_q = F.log_softmax(base_logits.detach().float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def rows_nll_and_kl(head, rows, targets, softcap, base_rows=None):
    """NLL of ``targets`` (and KL to the base when ``base_rows`` is given) for hidden rows, chunked over rows."""
    nll, kl = [], []
    step = chunk_rows(head.weight.shape[0])
    for s in range(0, rows.shape[0], step):
        logits = head_logits(head, rows[s : s + step], softcap)  # (n, V)
        nll.append(target_nll(logits, targets[s : s + step]))
        if base_rows is not None:
            with torch.no_grad():
                base_logits = head_logits(head, base_rows[s : s + step], softcap)
            kl.append(rows_kl(logits, base_logits))
    empty = rows.new_zeros(0, dtype=torch.float32)
    return (torch.cat(nll) if nll else empty), (torch.cat(kl) if kl else empty)


@contextlib.contextmanager
def capture_hidden(decoder):
    """Record the decoder's ``last_hidden_state`` during a forward of the (possibly wrapped) full model."""
    box = {}

    def hook(_module, _args, output):
        box["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = decoder.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def unwrap(model):
    """The module under DDP/accelerate wrappers (``.module``), PEFT models left as they are."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def base_hidden(model, reference, input_ids, attention_mask) -> torch.Tensor:
    """Decoder output of the base model: ``reference`` if given, else ``model`` with its adapter disabled."""
    with torch.no_grad():
        if reference is not None:
            decoder = split_causal_lm(reference)[0]
            return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        inner = unwrap(model)
        if not hasattr(inner, "disable_adapter"):
            raise ValueError("KL to the base needs a PEFT model (adapter disabled = base) or a reference model")
        with inner.disable_adapter():
            decoder = split_causal_lm(inner)[0]
            return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def compute_masked_loss(model, inputs: dict, num_items=None, kl_coef: float = 0.0, reference=None):
    """Masked (weighted) NLL [+ KL to the base] of one micro-batch, normalised as in the module docstring.

    The full model's forward runs once (through any DDP wrapper, asking for a single logit row), its decoder
    output is captured, and the LM head runs only on rows that predict a trained token. Returns
    ``(loss, stats)`` with ``stats`` = detached ``nll_sum``, ``kl_sum``, ``trained_tokens``.
    """
    input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    weight = inputs.get("loss_weight")
    decoder, head, softcap = split_causal_lm(unwrap(model))
    with capture_hidden(decoder) as box:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    hidden = box["hidden"]  # (B, T, H)
    predict = trained_rows(labels)  # (B, T-1)
    rows = hidden[:, :-1][predict]  # (N, H)
    targets = labels[:, 1:][predict]  # (N,)
    w = weight[:, 1:][predict] if weight is not None else torch.ones_like(targets, dtype=torch.float32)
    base_rows = None
    if kl_coef > 0:
        base_rows = base_hidden(model, reference, input_ids, attention_mask)[:, :-1][predict]
    nll, kl = rows_nll_and_kl(head, rows, targets, softcap, base_rows)
    count = predict.sum()
    denominator = num_items if num_items is not None else count
    # `hidden.sum() * 0` keeps the graph connected when no row is trained (backward must still run everywhere).
    loss = masked_loss(nll, w, denominator) + hidden.sum() * 0.0
    if kl_coef > 0:
        loss = loss + kl_coef * masked_loss(kl, w, denominator)
    stats = {"nll_sum": (w * nll.detach()).sum(), "kl_sum": (w * kl.detach()).sum() if kl_coef > 0 else None,
             "trained_tokens": count}
    return loss, stats


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the step is not applied."""


class MaskedLossMixin:
    """Put before ``Trainer`` / ``SFTTrainer`` in the bases to train with :func:`compute_masked_loss`.

    ``class MyTrainer(MaskedLossMixin, SFTTrainer): pass`` -- then pass ``kl_coef``/``reference`` if wanted and a
    collator that keeps ``loss_weight`` (:class:`forgetless.train.collate.MaskedBatchCollator`).
    """

    def __init__(self, *args, kl_coef: float = 0.0, reference=None, record_stats: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_coef, self.reference, self.record_stats = kl_coef, reference, record_stats
        # Makes the Trainer count `num_items_in_batch` over the whole accumulation step and treat our loss as
        # already normalised by it (it is never passed to the model: compute_loss below owns the loss).
        self.model_accepts_loss_kwargs = True
        self.loss_stats: list[dict] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, stats = compute_masked_loss(model, inputs, num_items_in_batch, self.kl_coef, self.reference)
        # Checked before backward: a non-finite loss never reaches the weights, the optimizer state or a
        # checkpoint, so the last checkpoint is the last good one. (One host sync per micro-batch.)
        if model.training and not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(f"training loss became {loss.detach().float().item()} at step "
                                     f"{self.state.global_step + 1}; the step was not applied")
        if model.training and self.record_stats:  # read (and cleared) by forgetless.train.stage's loss log
            self.loss_stats.append({k: (float(v) if v is not None else None) for k, v in stats.items()})
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # DDP averages gradients over processes; the count is already summed over them.
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss.detach()}) if return_outputs else loss
