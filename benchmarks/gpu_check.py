"""The GPU check: what the CPU machines cannot measure, in one run (a few minutes on one H100 / H200).

    bash benchmarks/gpu_check.sh                     # CUDA machine, after scripts/setup.sh
    bash benchmarks/gpu_check.sh --dry-run           # CPU, tiny random model: checks this script in about a minute

On the embedded model (SmolLM2-135M-Instruct) and MBPP training examples it measures:

1. bf16 vs fp32 scoring: max |Δnll| over response tokens and the share of τ=2.5 mask decisions that flip;
2. scoring tokens/s (forgetless's ``score_encoded``, bf16) and model-FLOPs utilisation, 2·N·tokens/s / peak;
3. training tokens/s (``Trainer.training_step`` of forgetless's masked loss, STM τ=2.5, full fine-tuning, bf16
   weights) and MFU, 6·N·tokens/s / peak;
4. vLLM vs HF scoring (``prompt_logprobs``): throughput, agreement with fp32 and bf16 HF, GPU memory given back by
   ``close()``; skipped with a message when vllm is not installed;
5. ``pytest -m gpu``.

N counts every parameter once (a tied embedding once: as the LM head it is compute, as a lookup it is free). MFU uses
the model's FLOPs of a whole forward; forgetless runs the LM head on scored / trained rows only, so the hardware
does less than that. Peak bf16 dense FLOPs come from ``--peak-tflops`` or the table below, by device name.
Writes ``summary.json`` and ``summary.md`` into ``--out-dir`` (default benchmarks/results/gpu/).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from NVIDIA's data sheets; the first name found in the
# device name wins, so the PCIe H100 comes before the SXM one.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "A100": 312.0}
TAU = 2.5


def peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    """(peak bf16 TFLOP/s, where it came from)."""
    if override:
        return override, "--peak-tflops"
    if not device.startswith("cuda"):
        return None, "no GPU: MFU not computed"
    name = torch.cuda.get_device_name()
    found = next((k for k in PEAK_BF16_TFLOPS if k in name), None)
    return ((PEAK_BF16_TFLOPS[found], f"table ({found})") if found
            else (None, f"{name} not in the table: pass --peak-tflops"))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    """(median seconds over ``repeats`` runs after one warm-up, the last result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def tiny_model_dir(tokenizer, out: Path) -> str:
    """A 2-layer random Llama with the embedded tokenizer's vocabulary (head_dim 64, as vLLM's kernels want)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def compare_scores(ref: list[np.ndarray], other: list[np.ndarray]) -> dict:
    """Agreement of two scorings of the same examples: |Δnll| on response tokens and τ=2.5 mask flips."""
    from forgetless.core.masking import above_tau

    a, b = np.concatenate(ref), np.concatenate(other)
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        raise AssertionError("the two scorings score different tokens")
    scored = ~np.isnan(a)
    diff = np.abs(a[scored] - b[scored])
    flips = above_tau(a[scored], TAU) != above_tau(b[scored], TAU)
    return {"response_tokens": int(scored.sum()), "max_abs_diff_nll": float(diff.max()),
            "mean_abs_diff_nll": float(diff.mean()), "masked_fraction_ref": float(above_tau(a[scored], TAU).mean()),
            "masked_fraction_other": float(above_tau(b[scored], TAU).mean()),
            "mask_flips": int(flips.sum()), "mask_flip_share": float(flips.mean())}


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_scoring(model_dir: str, tokenizer, encoded, args, peak: float | None) -> tuple[dict, dict]:
    """Steps 1 and 2; returns (results, the fp32 and bf16 scores for step 4)."""
    from forgetless.lm.modeling import load_model
    from forgetless.lm.scoring import score_encoded

    tokens = sum(len(e) for e in encoded)
    scores, results = {}, {"examples": len(encoded), "tokens": tokens}
    for dtype in ("float32", "bfloat16"):
        model = load_model(model_dir, dtype=dtype, device=args.device)
        n_params = sum(p.numel() for p in model.parameters())
        seconds, scores[dtype] = timed(lambda model=model: score_encoded(model, encoded, tokenizer.pad_token_id,
                                                                         args.batch_tokens),
                                       args.device, args.repeats)
        results[f"tokens_per_s_{dtype}"] = tokens / seconds
        model = None  # the last reference, before empty_cache
        empty_cache()
    results["parameters"] = n_params
    results["bf16_vs_fp32"] = compare_scores(scores["float32"], scores["bfloat16"])
    results["mfu_bf16"] = 2 * n_params * results["tokens_per_s_bfloat16"] / (peak * 1e12) if peak else None
    return results, scores


def check_training(model_dir: str, tokenizer, args, peak: float | None) -> dict:
    """Step 3: full fine-tuning steps (forward + backward) of the STM masked loss; the batch is bench_train.py's."""
    from transformers import TrainingArguments

    from forgetless.lm.modeling import load_model
    from forgetless.train.stage import _trainer_class

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import build_batch

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = load_model(model_dir, dtype="bfloat16", device=args.device)
    model.config.use_cache = False
    sft, stm = build_batch(tokenizer, args.train_batch, args.train_length, model)
    # A random (--tiny) model finds every token surprising and STM masks them all: train on SFT labels then.
    loss_labels = "stm" if (stm["labels"][:, 1:] != -100).any() else "sft (STM masked every token)"
    stm = {k: v.to(args.device) for k, v in (stm if loss_labels == "stm" else sft).items()}
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, report_to=[], use_cpu=args.device == "cpu",
                                  remove_unused_columns=False, label_names=["labels"])
        trainer = _trainer_class()(model=model, args=targs)
        trained = (stm["labels"][:, 1:] != -100).sum()

        def step():
            loss = trainer.training_step(model, stm, trained)
            model.zero_grad(set_to_none=True)
            return loss

        seconds, loss = timed(step, args.device, args.train_steps)
    tokens = int(stm["attention_mask"].sum())
    n_params = sum(p.numel() for p in model.parameters())
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    model = trainer = None
    empty_cache()
    return {"batch": args.train_batch, "length": args.train_length, "labels": loss_labels, "tokens_per_step": tokens,
            "trained_tokens": int(trained), "step_s": seconds, "tokens_per_s": tokens / seconds, "loss": float(loss),
            "cuda_peak_gib": peak_mem, "mfu": 6 * n_params * tokens / seconds / (peak * 1e12) if peak else None}


def check_vllm(model_dir: str, tokenizer, encoded, scores: dict, hf_tokens_per_s: float, args) -> dict:
    """Step 4: vLLM's prompt_logprobs scoring against the HF path on the same examples."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed (pip install vllm on this machine to include it)"}
    if not args.device.startswith("cuda"):
        return {"skipped": "vLLM needs a CUDA device"}
    from vllm import __version__ as vllm_version

    from forgetless.lm.vllm_backend import VllmEngine

    free_before = torch.cuda.mem_get_info()[0]
    started = time.perf_counter()
    engine = VllmEngine(model_dir, tokenizer, dtype="bfloat16", gpu_memory_utilization=args.vllm_memory,
                        max_model_len=args.max_length + 1, show_progress=False)
    startup = time.perf_counter() - started
    try:
        seconds, ours = timed(lambda: engine.score(encoded), args.device, args.repeats)
    finally:
        engine.close()
    tokens = sum(len(e) for e in encoded)
    return {"vllm_version": vllm_version, "startup_s": startup, "tokens_per_s": tokens / seconds,
            "vs_hf_bf16_speed": (tokens / seconds) / hf_tokens_per_s,
            "vs_hf_fp32": compare_scores(scores["float32"], ours),
            "vs_hf_bf16": compare_scores(scores["bfloat16"], ours), "gpu_free_gib_before": free_before / 2**30,
            "gpu_free_gib_after_close": torch.cuda.mem_get_info()[0] / 2**30}


def run_gpu_tests(paths: list[str]) -> dict:
    """Step 5: ``pytest -m gpu`` (skipped tests count as skipped: on a CPU every one of them is)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *paths]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": lines[-1] if lines else "",
            "seconds": time.perf_counter() - started, "tail": lines[-30:]}


def environment(args, peak, source) -> dict:
    cuda = args.device.startswith("cuda")
    return {"dry_run": args.dry_run,
            "model": "tiny random Llama (embedded tokenizer)" if args.tiny else "embedded (SmolLM2-135M-Instruct)",
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "gpus": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__,
            "python": platform.python_version(),
            "peak_bf16_tflops": peak, "peak_source": source, "tau": TAU, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def fmt(x, spec=".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(summary: dict) -> str:
    env, sc, tr, vl, pt = (summary[k] for k in ("environment", "scoring", "training", "vllm", "pytest_gpu"))
    lines = ["# GPU check", ""]
    if env["dry_run"]:
        lines += ["**Dry run on a CPU with a tiny random model: this checks the script, it measures nothing.**", ""]
    lines += [f"{env['device']} ({env['gpus']} GPU), torch {env['torch']}, {env['model']}, {env['time']}; "
              f"peak bf16 {fmt(env['peak_bf16_tflops'])} TFLOP/s ({env['peak_source']}).", "",
              "| measure | value |", "|---|---|"]
    b = sc["bf16_vs_fp32"]
    lines += [f"| bf16 vs fp32 scoring, {b['response_tokens']} response tokens of {sc['examples']} MBPP examples: max "
              f"/ mean abs Δnll | {b['max_abs_diff_nll']:.4f} / {b['mean_abs_diff_nll']:.5f} nats |",
              f"| τ={env['tau']} mask decisions that flip (bf16 vs fp32) | {b['mask_flips']} "
              f"({b['mask_flip_share']:.3%}); masked {b['masked_fraction_ref']:.3f} vs "
              f"{b['masked_fraction_other']:.3f} |",
              f"| scoring tokens/s, fp32 / bf16 | {sc['tokens_per_s_float32']:.0f} "
              f"/ {sc['tokens_per_s_bfloat16']:.0f} |",
              f"| scoring MFU (2·N·tokens/s, N = {sc['parameters'] / 1e6:.1f} M) | {fmt(sc['mfu_bf16'], '.2%')} |",
              f"| training tokens/s (full fine-tuning, {tr['labels']} labels, batch {tr['batch']} × "
              f"≤{tr['length']}) | {tr['tokens_per_s']:.0f} ({tr['step_s']:.3f} s/step) |",
              f"| training MFU (6·N·tokens/s) | {fmt(tr['mfu'], '.2%')} |"]
    if "skipped" in vl:
        lines.append(f"| vLLM vs HF scoring | skipped: {vl['skipped']} |")
    else:
        lines += [f"| vLLM {vl['vllm_version']} scoring tokens/s (vs HF bf16) | "
                  f"{vl['tokens_per_s']:.0f} ({vl['vs_hf_bf16_speed']:.2f}×), startup {vl['startup_s']:.0f} s |",
                  f"| vLLM vs HF fp32: max abs Δnll, mask flips | {vl['vs_hf_fp32']['max_abs_diff_nll']:.4f}, "
                  f"{vl['vs_hf_fp32']['mask_flip_share']:.3%} |",
                  f"| vLLM vs HF bf16: max abs Δnll, mask flips | {vl['vs_hf_bf16']['max_abs_diff_nll']:.4f}, "
                  f"{vl['vs_hf_bf16']['mask_flip_share']:.3%} |",
                  f"| GPU memory free before vLLM / after close() | {vl['gpu_free_gib_before']:.1f} "
                  f"/ {vl['gpu_free_gib_after_close']:.1f} GiB |"]
    exit_code = "" if pt["returncode"] is None else f" (exit {pt['returncode']})"
    lines.append(f"| `pytest {pt['command'].split('pytest ', 1)[-1]}` | {pt['summary']}{exit_code} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=None, help="default benchmarks/results/gpu (dry run: .../gpu-dry-run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of the embedded one")
    parser.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny, small sizes: checks the script")
    parser.add_argument("--examples", type=int, default=256, help="MBPP training examples scored")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-length", type=int, default=512)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--vllm-memory", type=float, default=0.5, help="vLLM's gpu_memory_utilization")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak (default: the table)")
    parser.add_argument("--pytest", nargs="*", default=["tests"], help="paths for pytest -m gpu (none: skip)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
        args.examples, args.repeats, args.train_batch, args.train_length, args.train_steps = 6, 1, 2, 128, 1
        args.pytest = args.pytest if args.pytest != ["tests"] else ["tests/test_gpu.py", "tests/test_vllm.py"]
    args.out_dir = Path(args.out_dir or ROOT / "benchmarks" / "results" / ("gpu-dry-run" if args.dry_run else "gpu"))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (torch.cuda.is_available() is false); --dry-run checks the script on a CPU")
    from forgetless.lm.data import load_examples
    from forgetless.lm.modeling import load_tokenizer, resolve_model_path
    from forgetless.lm.templates import encode_conversation

    peak, source = peak_tflops(args.device, args.peak_tflops)
    tokenizer = load_tokenizer("embedded")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(tokenizer, Path(tmp) / "tiny") if args.tiny else resolve_model_path("embedded")
        encoded = [encode_conversation(tokenizer, ex.messages, args.max_length)
                   for ex in load_examples("mbpp-train", limit=args.examples)]
        print(f"scoring {len(encoded)} MBPP examples in fp32 and bf16 on {args.device} ...", flush=True)
        scoring, scores = check_scoring(model_dir, tokenizer, encoded, args, peak)
        print("training steps ...", flush=True)
        training = check_training(model_dir, tokenizer, args, peak)
        print("vLLM ...", flush=True)
        vllm = check_vllm(model_dir, tokenizer, encoded, scores, scoring["tokens_per_s_bfloat16"], args)
    print(f"pytest -m gpu {' '.join(args.pytest)} ...", flush=True)
    tests = (run_gpu_tests(args.pytest) if args.pytest
             else {"command": "pytest -m gpu", "returncode": None, "summary": "not run (--pytest without paths)"})
    summary = {"environment": environment(args, peak, source), "scoring": scoring, "training": training, "vllm": vllm,
               "pytest_gpu": tests}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out_dir / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"written: {args.out_dir / 'summary.json'}, {args.out_dir / 'summary.md'}")


if __name__ == "__main__":
    main()
