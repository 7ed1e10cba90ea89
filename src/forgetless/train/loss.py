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
* ``loss_type="dft"`` (Dynamic Fine-Tuning, Wu et al. 2025; TRL's ``loss_type="dft"``) multiplies each trained
  token's weight by its own probability under the *current* model, detached: ``w_i * exp(-nll_i).detach()``. The
  static ``inverse-ppl`` policy (:mod:`forgetless.core.masking`) instead fixes that weight once, from the *base*
  model, before training: the two agree at step 0 and part as the model learns.
* ``kl_i = KL(p_tuned || p_base)`` of the next-token distributions at the rows that predict trained tokens; it is
  zero when the model equals the base and its gradient pulls the tuned distribution back toward the base.

The Hugging Face Trainer supplies the step-wide count as ``num_items_in_batch`` (it counts ``labels[..., 1:] !=
-100``); :class:`MaskedLossMixin` makes sure it is counted and uses it. Across processes (transformers 5.23:
``average_tokens_across_devices``, on by default, gathers and sums the per-process counts; the mixin sums them itself
when it is off) each process divides its own numerator by the global count and multiplies by the number of
processes, because DDP, FSDP and DeepSpeed *average* gradients over processes: the result is the gradient of the
one big batch, however unevenly the trained tokens fall on the processes.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from forgetless.core.errors import ConfigError, ForgetlessError
from forgetless.core.labels import IGNORE_INDEX
from forgetless.core.logits import chunk_rows, head_logits, head_rows, split_causal_lm, target_nll
from forgetless.train.parallel import any_process, call_inside_forward, gather_rows, unwrap

logger = logging.getLogger(__name__)


def trained_rows(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Which hidden rows predict a trained token: ``(B, T) -> (B, T-1)`` bool; row ``i-1`` predicts label ``i``.

    In a padding-free row (``position_ids`` restarting at 0 per example) an example's first token is never trained:
    the row before it is the previous example's (the collators already give it label -100).
    """
    predict = labels[:, 1:] != IGNORE_INDEX
    return predict & (position_ids[:, 1:] > 0) if position_ids is not None else predict


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


LOSS_TYPES = ("nll", "dft")


def dft_weight(nll: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DFT's per-token weight: ``weight * p`` with ``p = exp(-nll)`` the current model's probability of the token,
    detached (no gradient flows through the weight).

    >>> dft_weight(torch.tensor([0.0, 0.6931471805599453]), torch.tensor([1.0, 1.0]))
    tensor([1.0000, 0.5000])
    """
    return weight * torch.exp(-nll.detach().float())


def rows_kl(tuned_logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_tuned || p_base)`` per row: ``(N, V), (N, V) -> (N,)`` in nats, >= 0, 0 iff the rows are equal.

    Gradients flow only into ``tuned_logits``: the base distribution is the fixed anchor.
    """
    log_p = F.log_softmax(tuned_logits.float(), dim=-1)
    log_q = F.log_softmax(base_logits.detach().float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def rows_nll_and_kl(head, rows, targets, softcap, base_rows=None, base_logits=None):
    """NLL of ``targets`` (and KL to the base when ``base_rows`` is given) for hidden rows, chunked over rows.

    ``base_logits(rows) -> (n, V)`` computes the base model's logits of base hidden rows (default: this ``head``).
    """
    nll, kl = [], []
    step = chunk_rows(head_rows(head))
    for s in range(0, rows.shape[0], step):
        logits = head_logits(head, rows[s : s + step], softcap)  # (n, V)
        nll.append(target_nll(logits, targets[s : s + step]))
        if base_rows is not None:
            with torch.no_grad():
                base = (base_logits(base_rows[s : s + step]) if base_logits is not None
                        else head_logits(head, base_rows[s : s + step], softcap))
            kl.append(rows_kl(logits, base))
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


def base_hidden(model, reference, **model_inputs) -> torch.Tensor:
    """Decoder output of the base model: ``reference`` if given, else ``model`` with its adapter disabled."""
    with torch.no_grad():
        if reference is not None:
            decoder = split_causal_lm(reference)[0]
            return decoder(**model_inputs, use_cache=False).last_hidden_state
        inner = unwrap(model)
        if not hasattr(inner, "disable_adapter"):
            raise ConfigError("KL to the base needs a PEFT model (adapter disabled = base) or a reference model")
        with inner.disable_adapter():
            decoder = split_causal_lm(inner)[0]
            return decoder(**model_inputs, use_cache=False).last_hidden_state


def base_head(model, reference):
    """``rows -> logits`` of the base model's own LM head: the reference's (full fine-tuning trains the head), or the
    model's with its adapter disabled (an adapter may target ``lm_head``)."""
    if reference is not None:
        _, head, softcap = split_causal_lm(reference)
        return lambda rows: head_logits(head, rows, softcap)
    inner = unwrap(model)
    _, head, softcap = split_causal_lm(inner)

    def logits(rows):
        with inner.disable_adapter():
            return head_logits(head, rows, softcap)

    return logits


def head_is_local(head) -> bool:
    """Whether the LM head can run on picked rows in this process: not while it is a DTensor shard (tensor
    parallelism). A ZeRO-3 partition is fine: calling the module gathers it."""
    weight = head.weight
    if hasattr(weight, "ds_id"):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return weight.numel() > 0
    return not isinstance(weight, DTensor) and weight.numel() > 0


_FALLBACK_LOGGED: set[str] = set()


def _plain_head_rows(model, reference, model_inputs, predict, kl_coef):
    """Fallback: the model's own forward with full logits ``(B, T, V)``; logits of trained rows (and the base's)."""
    logits = model.forward(**model_inputs, use_cache=False).logits
    rows = logits[:, :-1][predict].float()  # (N, V)
    base = None
    if kl_coef > 0:
        with torch.no_grad():
            if reference is not None:
                base = reference(**model_inputs, use_cache=False).logits
            else:
                with model.disable_adapter():
                    base = model.forward(**model_inputs, use_cache=False).logits
            base = base[:, :-1][predict].float()
    return rows, base, logits


def _loss_in_forward(model, inputs, num_items, kl_coef, reference, loss_type="nll", **model_inputs):
    """:func:`compute_masked_loss` as it runs inside the (wrapped) model's forward; returns tensors only.

    ``model_inputs``: ``input_ids`` and ``attention_mask`` (padded) or ``position_ids`` (padding-free), or both."""
    labels = inputs["labels"]
    weight = inputs.get("loss_weight")
    decoder, head, softcap = split_causal_lm(model)
    predict = trained_rows(labels, model_inputs.get("position_ids"))  # (B, T-1)
    targets = labels[:, 1:][predict]  # (N,)
    w = weight[:, 1:][predict] if weight is not None else torch.ones_like(targets, dtype=torch.float32)
    if head_is_local(head):
        with capture_hidden(decoder) as box:
            # `.forward`, not `model(...)`: we are inside its call already, and running the wrapper's hooks (FSDP's
            # root unshard / reshard) a second time would reshard the head before we use it.
            model.forward(**model_inputs, logits_to_keep=1, use_cache=False)
        hidden = box["hidden"]  # (B, T, H)
        base_rows = None
        if kl_coef > 0:
            base_rows = base_hidden(model, reference, **model_inputs)[:, :-1][predict]
        nll, kl = rows_nll_and_kl(head, hidden[:, :-1][predict], targets, softcap, base_rows,
                                  base_head(model, reference) if kl_coef > 0 else None)
    else:
        reason = f"the LM head weight is a {type(head.weight).__name__} shard here (tensor parallelism?)"
        if reason not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(reason)
            logger.warning("masked loss: %s; computing full logits (batch x seq x vocab) instead of trained rows only",
                           reason)
        rows, base, hidden = _plain_head_rows(model, reference, model_inputs, predict, kl_coef)
        nll = torch.logsumexp(rows, dim=-1) - rows.gather(1, targets[:, None]).squeeze(1)
        kl = rows_kl(rows, base) if base is not None else rows.new_zeros(0)
    if loss_type == "dft":
        w = dft_weight(nll, w)
    count = predict.sum()
    denominator = num_items if num_items is not None else count
    # `hidden.sum() * 0` keeps the graph connected when no row is trained (backward must still run everywhere).
    loss = masked_loss(nll, w, denominator) + hidden.sum() * 0.0
    if kl_coef > 0:
        loss = loss + kl_coef * masked_loss(kl, w, denominator)
    return {"loss": loss, "nll_sum": (w * nll.detach()).sum(),
            "kl_sum": (w * kl.detach()).sum() if kl_coef > 0 else w.new_zeros(()), "trained_tokens": count}


def compute_masked_loss(model, inputs: dict, num_items=None, kl_coef: float = 0.0, reference=None,
                        loss_type: str = "nll"):
    """Masked (weighted) NLL [+ KL to the base] of one micro-batch, normalised as in the module docstring.

    The full model's forward runs once (asking for a single logit row), its decoder output is captured, and the LM
    head runs only on rows that predict a trained token. All of it runs inside the forward of whatever wraps the
    model (DDP, FSDP, DeepSpeed: :func:`forgetless.train.parallel.call_inside_forward`), so sharded weights are
    gathered and their gradients reduced; where the head cannot run on picked rows (a tensor-parallel shard) the
    model's plain head (full logits) is used, with a warning. A padding-free batch (``position_ids`` restarting at 0
    per example, no ``attention_mask``: :class:`forgetless.train.collate.FlatBatchCollator`, TRL's ``padding_free``)
    gives the loss of the padded batch of the same examples when the attention keeps them apart
    (:func:`forgetless.core.packing.packing_isolates`). Returns ``(loss, stats)`` with ``stats`` = detached
    ``nll_sum``, ``kl_sum`` (None without KL), ``trained_tokens``.
    """
    model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if inputs.get(k) is not None}
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    out = call_inside_forward(model, _loss_in_forward, inputs, num_items, kl_coef, reference, loss_type, **model_inputs)
    stats = {"nll_sum": out["nll_sum"], "kl_sum": out["kl_sum"] if kl_coef > 0 else None,
             "trained_tokens": out["trained_tokens"]}
    return out["loss"], stats


class NonFiniteLossError(ForgetlessError, RuntimeError):
    """The training loss became NaN or infinite; the step is not applied."""


class MaskedLossMixin:
    """Put before ``Trainer`` / ``SFTTrainer`` in the bases to train with :func:`compute_masked_loss`.

    ``class MyTrainer(MaskedLossMixin, SFTTrainer): pass`` -- then pass ``kl_coef``/``reference`` if wanted and a
    collator that keeps ``loss_weight`` (:class:`forgetless.train.collate.MaskedBatchCollator`).

    Across processes (DDP, FSDP, DeepSpeed) the denominator is the trained-token count of the whole step on all
    processes, a non-finite loss on any process stops every process, and :meth:`pop_loss_stats` sums the token
    statistics over processes.
    """

    def __init__(self, *args, kl_coef: float = 0.0, reference=None, record_stats: bool = False,
                 loss_type: str = "nll", **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_coef, self.reference, self.record_stats = kl_coef, reference, record_stats
        self.loss_type = loss_type
        # Makes the Trainer count `num_items_in_batch` over the whole accumulation step and treat our loss as
        # already normalised by it (it is never passed to the model: compute_loss below owns the loss).
        self.model_accepts_loss_kwargs = True
        self._stat_sums: torch.Tensor | None = None  # (nll_sum, kl_sum, trained_tokens) since the last pop

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        processes = self.accelerator.num_processes
        if processes > 1 and num_items_in_batch is not None and not self.args.average_tokens_across_devices:
            # The Trainer counted this process's tokens only; the normalisation needs every process's.
            num_items_in_batch = self.accelerator.reduce(torch.as_tensor(num_items_in_batch, device=self.args.device),
                                                         reduction="sum")
        loss, stats = compute_masked_loss(model, inputs, num_items_in_batch, self.kl_coef, self.reference,
                                          self.loss_type)
        # Checked before backward: a non-finite loss never reaches the weights, the optimizer state or a
        # checkpoint, so the last checkpoint is the last good one. (One host sync per micro-batch, and one small
        # all-reduce across processes, so that every process stops instead of waiting for the one that raised.)
        if model.training:
            finite = torch.isfinite(loss.detach()).all()
            if any_process(~finite):
                where = (f"became {loss.detach().float().item()}" if not finite
                         else "became non-finite on another process")
                raise NonFiniteLossError(f"training loss {where} at step {self.state.global_step + 1}; "
                                         "the step was not applied")
        if model.training and self.record_stats:  # read (and cleared) by forgetless.train.stage's loss log
            kl = stats["kl_sum"] if stats["kl_sum"] is not None else stats["nll_sum"].new_zeros(())
            row = torch.stack([stats["nll_sum"], kl, stats["trained_tokens"]]).double()
            self._stat_sums = row if self._stat_sums is None else self._stat_sums + row
        if num_items_in_batch is not None and processes > 1:
            # DDP / FSDP / DeepSpeed average gradients over processes; the count is already summed over them.
            loss = loss * processes
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def pop_loss_stats(self) -> dict:
        """Token statistics since the last call, summed over processes: ``nll_sum``, ``kl_sum``, ``trained_tokens``,
        and ``trained_tokens_by_rank``. A collective: call it on every process at the same step."""
        sums = self._stat_sums if self._stat_sums is not None else torch.zeros(3, dtype=torch.float64,
                                                                               device=self.args.device)
        self._stat_sums = None
        by_rank = gather_rows(sums.to(self.args.device)).cpu()  # (world, 3)
        total = by_rank.sum(dim=0)
        return {"nll_sum": float(total[0]), "kl_sum": float(total[1]), "trained_tokens": int(total[2]),
                "trained_tokens_by_rank": [int(t) for t in by_rank[:, 2]]}
