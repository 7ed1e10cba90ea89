"""``forgetless train`` across processes, on CPU with 2 gloo processes launched by torchrun / accelerate launch.

The invariant: 2 processes x batch b (x accumulation a) train exactly like 1 process x batch 2b (x a), with an
uneven number of trained tokens on the two processes (where dividing by each process's own count would be wrong).
The Trainer's seeded sampler makes one permutation of the table on every process and hands size-b batches out in
turn (rank r gets batches r, r + 2, ...), so a size-2b batch of the single process holds exactly the two size-b
batches the two processes train on at the same micro-step.

FSDP through the Trainer needs GPUs (accelerate 1.15 runs CPU processes as DDP); here the masked loss itself is
checked under FSDP2 on CPU (``tests/distributed_worker.py``), and the end-to-end launches with the shipped accelerate
configs are the ``gpu`` tests at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import batch, build_model, build_tokenizer, conversations
from forgetless.train.collate import build_sft_table, write_table
from forgetless.train.stage import TrainConfig, run_train

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "src" / "forgetless" / "configs" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def accelerate_launch(config: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config),
            "--num_processes", str(nproc), "--main_process_port", str(free_port())]


def launch(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT / "tests")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny model, an SFT table of 24 conversations and an STM-like copy masked unevenly (3 rows fully)."""
    root = tmp_path_factory.mktemp("dist")
    tok = build_tokenizer("chatml")
    build_model(len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = build_sft_table(conversations(24), tok)
    write_table(rows, root / "sft.parquet")
    for i, r in enumerate(rows):
        for j, y in enumerate(r["labels"]):
            if y != -100 and (j % (2 + i % 3) == 0 or i % 7 == 3):
                r["labels"][j], r["loss_weight"][j] = -100, 0.0
    write_table(rows, root / "stm.parquet")
    return root


def train_args(world: Path, name: str, table: str, **kw) -> dict:
    base = dict(data=str(world / f"{table}.parquet"), output_dir=str(world / name), model=str(world / "model"),
                device="cpu", lora_dropout=0.0, optim="sgd", learning_rate=0.5, max_steps=3, grad_accum=2,
                method=table)
    return {**base, **kw}


def cli(args: dict) -> list[str]:
    return ["-m", "forgetless.cli", "train", *[f"{k}={v}" for k, v in args.items()]]


def loss_lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]


def weights(out: Path, adapter: str) -> dict:
    from safetensors.torch import load_file

    return load_file(out / ("model/model.safetensors" if adapter == "full" else "adapter/adapter_model.safetensors"))


def assert_same_training(two: Path, one: Path, adapter: str) -> dict:
    """Per-step loss and trained tokens equal, the final weights equal to 1e-5; returns the differences."""
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed"] == "MULTI_CPU"  # really 2 processes, gloo
    assert json.loads((one / "train_summary.json").read_text())["processes"] == 1
    a, b = loss_lines(two), loss_lines(one)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3]
    assert [x["trained_tokens"] for x in a] == [x["trained_tokens"] for x in b]  # the same micro-batches
    assert all(sum(x["trained_tokens_by_rank"]) == x["trained_tokens"] for x in a)
    assert any(len(set(x["trained_tokens_by_rank"])) > 1 for x in a)  # uneven across ranks
    dloss = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    assert dloss < 1e-5
    wa, wb = weights(two, adapter), weights(one, adapter)
    assert wa.keys() == wb.keys()
    dw = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert dw < 1e-5
    return {"max_dloss": dloss, "max_dweight": dw}


@pytest.mark.parametrize("launcher,table", [("torchrun", "sft"), ("accelerate", "stm")])
def test_two_processes_equal_one_with_twice_the_batch_lora(world, launcher, table):
    two = train_args(world, f"{launcher}-{table}-2x2", table, batch_size=2, merge=launcher == "torchrun")
    prefix = torchrun() if launcher == "torchrun" else [*accelerate_launch("ddp.yaml"), "--mixed_precision", "no"]
    launch([*prefix, *cli(two)])
    one = run_train(TrainConfig(**train_args(world, f"{launcher}-{table}-1x4", table, batch_size=4)))
    figures = assert_same_training(Path(two["output_dir"]), one, "lora")
    print(f"{launcher} lora {table}: {figures}")
    moved = weights(one, "lora")
    assert max(v.abs().max().item() for k, v in moved.items() if "lora_B" in k) > 1e-3  # it did train
    if two["merge"]:  # written by the first process alone, after the adapter every process saved
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        ids = torch.tensor([[5, 17, 42, 99, 7]])
        merged = AutoModelForCausalLM.from_pretrained(Path(two["output_dir"]) / "merged")
        tuned = PeftModel.from_pretrained(build_model(merged.config.vocab_size), one / "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-4)


def test_two_processes_equal_one_full_finetuning_with_kl_reference(world):
    """Full fine-tuning with KL to a whole reference copy on each process; the model saved through the Trainer."""
    kw = dict(adapter="full", method="kl", kl_coef=0.5, learning_rate=0.1)
    two = train_args(world, "full-kl-2x2", "stm", batch_size=2, **kw)
    launch([*torchrun(), *cli(two)])
    one = run_train(TrainConfig(**train_args(world, "full-kl-1x4", "stm", batch_size=4, **kw)))
    figures = assert_same_training(Path(two["output_dir"]), one, "full")
    print(f"torchrun full kl: {figures}")
    assert all(x["kl_per_token"] > 0 for x in loss_lines(one)[1:])
    for name in ("diagnostics.json", "manifest.json", "model/tokenizer_config.json"):
        assert (Path(two["output_dir"]) / name).is_file()
    assert not (Path(two["output_dir"]) / "model" / "training_args.bin").exists()
    assert not list(Path(two["output_dir"]).glob(".*.tmp"))


def test_masked_loss_under_fsdp2_equals_unsharded(tmp_path):
    """Raw FSDP2 (``fully_shard`` per layer and root, as accelerate does) on 2 CPU processes: loss and gradients."""
    launch([*torchrun(), str(ROOT / "tests" / "distributed_worker.py"), "fsdp", str(tmp_path / "fsdp.json")])
    results = json.loads((tmp_path / "fsdp.json").read_text())
    assert results["world_size"] == 2
    for case in ("full_sft", "full_kl_reference", "lora_kl"):
        r = results[case]
        print(case, {k: r[k] for k in ("dloss", "max_dgrad", "max_grad", "trained_tokens_by_rank")})
        assert not r["head_usable_outside_forward"] and r["fallback"] == []  # the trained-rows head, in the forward
        assert len(set(r["trained_tokens_by_rank"])) > 1
        assert r["dloss"] < 1e-5 and r["max_dgrad"] < 1e-6 and r["max_grad"] > 1e-2
        assert r["grads_compared"] == r["grads_expected"] > 0


def test_non_finite_loss_on_one_process_stops_every_process(world, tmp_path):
    run = tmp_path / "nan"
    cmd = [*torchrun(), str(ROOT / "tests" / "distributed_worker.py"), "nan", str(run), str(world / "model"),
           str(world / "sft.parquet")]
    launch(cmd, timeout=240)
    own, other = (run / "rank1.txt").read_text(), (run / "rank0.txt").read_text()
    assert own.startswith("NonFiniteLossError: training loss became nan at step 2")
    assert other.startswith("NonFiniteLossError: training loss became non-finite on another process at step 2")
    assert not (run / "adapter").exists() and not (run / "manifest.json").exists()


def test_data_parallel_is_refused_in_one_line(world, monkeypatch, capsys):
    """One process seeing several GPUs (faked: no GPU here) is refused before the model loads."""
    from transformers import TrainingArguments

    from forgetless.cli import main

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 4))
    out = world / "dp"
    code = main(["train", *[f"{k}={v}" for k, v in train_args(world, "dp", "sft", device="auto").items()]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("forgetless train: error: this process sees 4 GPUs and would train with nn.DataParallel")
    assert "torchrun --nproc_per_node 4" in err[0] and "CUDA_VISIBLE_DEVICES=0" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("with_reference", [False, True])
def test_plain_head_fallback_gives_the_same_loss_and_gradients(tokenizer, monkeypatch, with_reference):
    """Where the head cannot run on picked rows (a tensor-parallel shard) the full-logits path is used: same numbers."""
    import copy

    import forgetless.train.loss as loss_module
    from peft import LoraConfig, get_peft_model

    _, b = batch(tokenizer, n=3, mask_every=3)

    def model_and_reference():
        base = build_model(len(tokenizer))
        if with_reference:  # full fine-tuning: a moved head and a whole reference copy
            reference = copy.deepcopy(base).eval()
            torch.manual_seed(1)
            with torch.no_grad():
                base.lm_head.weight.add_(0.05 * torch.randn_like(base.lm_head.weight))
            return base.train(), reference
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        return model.train(), None

    def run():
        model, reference = model_and_reference()
        loss, stats = loss_module.compute_masked_loss(model, b, kl_coef=0.5, reference=reference)
        loss.backward()
        return loss.detach(), stats, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    rows_loss, rows_stats, rows_grads = run()
    monkeypatch.setattr(loss_module, "head_is_local", lambda head: False)
    plain_loss, plain_stats, plain_grads = run()
    assert rows_stats["kl_sum"].item() > 1e-4
    torch.testing.assert_close(plain_loss, rows_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain_stats["kl_sum"], rows_stats["kl_sum"], rtol=1e-4, atol=1e-6)
    assert plain_grads.keys() == rows_grads.keys()
    for k in rows_grads:
        torch.testing.assert_close(plain_grads[k], rows_grads[k], rtol=1e-4, atol=1e-6)


def test_kl_uses_the_reference_models_own_head(tokenizer):
    """Full fine-tuning trains the LM head: the base logits must come from the reference's head, not the tuned one."""
    import copy

    from forgetless.train.loss import compute_masked_loss

    model = build_model(len(tokenizer))
    reference = copy.deepcopy(model).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.add_(0.1 * torch.randn_like(model.lm_head.weight))  # only the head moved
    _, b = batch(tokenizer, n=2)
    _, stats = compute_masked_loss(model, b, kl_coef=1.0, reference=reference)
    assert stats["kl_sum"].item() > 1e-3


# --- GPU: the shipped accelerate configs end to end (2 GPUs at least; not run on the CPU-only machine) ---------

gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.mark.gpu
@gpus
@pytest.mark.parametrize("config,adapter", [("ddp.yaml", "lora"), ("fsdp.yaml", "lora"), ("fsdp.yaml", "full"),
                                            ("zero2.yaml", "lora"), ("zero3.yaml", "lora"), ("zero3.yaml", "full")])
def test_accelerate_configs_on_two_gpus_match_one_gpu(world, config, adapter):
    if config.startswith("zero"):
        pytest.importorskip("deepspeed")
    stem = f"gpu-{config.split('.')[0]}-{adapter}"
    # fp32 weights and no autocast, so that the two runs can be compared closely.
    kw = dict(adapter=adapter, device="cuda", dtype="float32", learning_rate=1e-3 if adapter == "full" else 1e-2)
    two = train_args(world, f"{stem}-2x2", "stm", batch_size=2, **kw)
    launch([*accelerate_launch(config), "--mixed_precision", "no", *cli(two)], timeout=900)
    one_args = train_args(world, f"{stem}-1x4", "stm", batch_size=4, **kw)
    launch([sys.executable, *cli(one_args)], timeout=900)
    summary = json.loads((Path(two["output_dir"]) / "train_summary.json").read_text())
    assert summary["processes"] == 2
    a, b = loss_lines(Path(two["output_dir"])), loss_lines(Path(one_args["output_dir"]))
    assert [x["trained_tokens"] for x in a] == [x["trained_tokens"] for x in b]
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], rel=1e-3)
    wa, wb = weights(Path(two["output_dir"]), adapter), weights(Path(one_args["output_dir"]), adapter)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k].float(), wb[k].float(), rtol=1e-3, atol=1e-4)
