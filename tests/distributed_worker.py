"""Run by tests/test_train_distributed.py under torchrun (CPU processes, gloo).

``fsdp OUT.json``: the masked loss under FSDP2. Each process builds the same tiny model, shards it the way accelerate's
FSDP2 does (``fully_shard`` on every decoder layer, then on the root), computes the masked loss of its half of a batch
through :func:`forgetless.train.loss.compute_masked_loss` and runs backward. The loss summed over processes and the
gathered gradients must equal those of one unsharded model on the whole batch. Rank 0 writes the differences to the
JSON file named on the command line.

``nan RUN_DIR MODEL DATA``: ``run_train`` where only rank 1's loss turns NaN at its second micro-batch; every rank
writes what stopped it to ``RUN_DIR/rank<R>.txt`` (a rank left waiting would never write).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py fsdp OUT.json``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from conftest import batch, build_model, build_tokenizer
from forgetless.core.logits import split_causal_lm


def perturbed(vocab: int):
    """The tiny model with its LM head and one layer moved off the seed-0 weights (so KL to the seed-0 base > 0)."""
    model = build_model(vocab)
    torch.manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
        model.model.layers[0].mlp.up_proj.weight.add_(0.05 * torch.randn_like(model.model.layers[0].mlp.up_proj.weight))
    return model.train()


def lora(model):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(2)
    with torch.no_grad():  # B = 0 would make the adapter the identity and KL zero
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft.train()


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in split_causal_lm(model)[0].layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def run_case(make, vocab: int, kl_coef: float, with_reference: bool, full_batch: dict, rank: int, world: int) -> dict:
    """One unsharded model on the whole batch, then the sharded one on this rank's half; the differences."""
    import forgetless.train.loss as loss_module

    num_items = (full_batch["labels"][:, 1:] != -100).sum()
    unsharded = make()
    base = build_model(vocab).eval() if with_reference else None  # the KL reference: whole, never sharded
    expected, _ = loss_module.compute_masked_loss(unsharded, full_batch, num_items, kl_coef, base)
    expected.backward()
    grads = {n: p.grad for n, p in unsharded.named_parameters() if p.grad is not None}

    model = shard(make())
    # Outside the forward the head is a DTensor shard: the loss only works because it runs inside the forward.
    outside = loss_module.head_is_local(split_causal_lm(model)[1])
    half = full_batch["input_ids"].shape[0] // world
    mine = {k: v[rank * half : (rank + 1) * half] for k, v in full_batch.items()}
    loss_module._FALLBACK_LOGGED.clear()
    loss, stats = loss_module.compute_masked_loss(model, mine, num_items, kl_coef,
                                                  copy.deepcopy(base) if base else None)
    (loss * world).backward()  # FSDP averages gradients over processes, as the Trainer mixin expects
    total = loss.detach().clone()
    dist.all_reduce(total)
    tokens = torch.tensor([int(stats["trained_tokens"])])
    per_rank = [torch.zeros_like(tokens) for _ in range(world)]
    dist.all_gather(per_rank, tokens)
    dgrad, compared = 0.0, 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        dgrad = max(dgrad, (g - grads[name]).abs().max().item())
        compared += 1
    return {"loss": total.item(), "expected": expected.item(), "dloss": abs(total.item() - expected.item()),
            "max_dgrad": dgrad, "grads_compared": compared, "grads_expected": len(grads),
            "max_grad": max(g.abs().max().item() for g in grads.values()),
            "head_usable_outside_forward": outside, "fallback": sorted(loss_module._FALLBACK_LOGGED),
            "trained_tokens_by_rank": [int(t) for t in per_rank]}


def nan_on_one_rank(run_dir: str, model: str, data: str) -> None:
    import forgetless.train.loss as loss_module
    from forgetless.train.stage import TrainConfig, run_train

    rank = int(os.environ["RANK"])
    real, calls = loss_module.compute_masked_loss, []

    def nan_on_rank_1(*args, **kwargs):
        calls.append(1)
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if rank == 1 and len(calls) == 2 else loss), stats

    loss_module.compute_masked_loss = nan_on_rank_1
    try:
        run_train(TrainConfig(data=data, output_dir=run_dir, model=model, device="cpu", max_steps=3, batch_size=2,
                              lora_dropout=0.0))
        message = "finished"
    except loss_module.NonFiniteLossError as e:
        message = f"NonFiniteLossError: {e}"
    Path(run_dir, f"rank{rank}.txt").write_text(message)


def fsdp_loss(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = build_tokenizer("chatml")
    _, full_batch = batch(tok, n=2 * world, mask_every=3)
    vocab = len(tok)
    results = {
        "world_size": world,
        "full_sft": run_case(lambda: perturbed(vocab), vocab, 0.0, False, full_batch, rank, world),
        "full_kl_reference": run_case(lambda: perturbed(vocab), vocab, 0.5, True, full_batch, rank, world),
        "lora_kl": run_case(lambda: lora(build_model(vocab)), vocab, 0.5, False, full_batch, rank, world),
    }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    {"fsdp": fsdp_loss, "nan": nan_on_one_rank}[sys.argv[1]](*sys.argv[2:])
