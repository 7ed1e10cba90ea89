"""FLOP rate of the embedded model's linear shapes by rows in one step: why more live rows decode faster on a CPU.

    python benchmarks/bench_matmul_rows.py

Shapes: the MLP's 576 -> 1,536 product and the LM head's 576 -> 49,152, fp32, the machine's default threads.
"""

import time

import torch


def rate(rows: int, weight: torch.Tensor) -> float:
    """GFLOP/s of ``x @ weight.T`` with ``rows`` rows, timed over repeats after one warm-up."""
    x = torch.randn(rows, weight.shape[1])
    torch.nn.functional.linear(x, weight)
    repeats = max(3, 20_000_000 // (rows * weight.shape[0]))
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, weight)
    seconds = (time.perf_counter() - start) / repeats
    return 2 * rows * weight.shape[0] * weight.shape[1] / seconds / 1e9


def main() -> None:
    torch.manual_seed(0)
    shapes = {"mlp 576x1536": torch.randn(1536, 576), "lm head 576x49152": torch.randn(49152, 576)}
    print(f"{'rows':>5} " + " ".join(f"{name:>18}" for name in shapes) + "   (GFLOP/s)")
    for rows in (1, 8, 16, 32, 64, 128, 256):
        print(f"{rows:>5} " + " ".join(f"{rate(rows, w):>18.0f}" for w in shapes.values()))


if __name__ == "__main__":
    main()
