#!/usr/bin/env python
"""Benchmark the distillation losses: forward + backward time and peak memory.

    python tools/bench_losses.py                       # every scale, CPU or the first GPU
    python tools/bench_losses.py --scales cityscapes-quarter --repeats 5
    python tools/bench_losses.py --markdown            # a table for BENCHMARKS.md

Compares ``losses.icsd_loss`` (batched matrix products) with a loop over class pairs written the way the
paper's public code does it (one KL call per pair), but with the correct definitions, so both compute the
same number. Each case runs in its own subprocess so that peak memory is that case's alone (CUDA:
``torch.cuda.max_memory_allocated``; CPU: growth of the peak resident set size after the inputs exist).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's flat modules (losses)

SCALES = {
    # name: (B, C, H, W)
    "voc": (6, 21, 513, 513),
    "cityscapes": (8, 19, 512, 1024),
    "cityscapes-quarter": (8, 19, 128, 256),
    "ade20k": (16, 150, 128, 128),
}
METHODS = ("icsd", "icsd-loop", "kd", "cwd", "ickd")


def pair_loop_icsd(s, t, temperature: float = 1.0):
    """ICSD with one KL call per class pair (the reference code's structure, correct definitions)."""
    import torch
    import torch.nn.functional as F

    def matrix(x):
        b, c = x.shape[:2]
        log_p = torch.log_softmax(x.float().flatten(2) / temperature, dim=-1)
        rows = []
        for i in range(c):
            row = [F.kl_div(log_p[:, j], log_p[:, i], reduction="none", log_target=True).sum(-1) for j in range(c)]
            rows.append(torch.stack(row, dim=-1))
        a = torch.stack(rows, dim=1)
        return a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return (matrix(s) - matrix(t.detach())).pow(2).mean()


def run_case(method: str, shape, repeats: int, device: str, dtype: str) -> dict:
    import torch

    import losses

    torch.manual_seed(0)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    s = (3 * torch.randn(shape, device=device)).to(dt).requires_grad_()
    t = (3 * torch.randn(shape, device=device)).to(dt)
    fn = {
        "icsd": lambda: losses.icsd_loss(s, t),
        "icsd-loop": lambda: pair_loop_icsd(s, t),
        "kd": lambda: losses.kd_loss(s, t),
        "cwd": lambda: losses.cwd_loss(s, t),
        "ickd": lambda: losses.ickd_loss(s, t),
    }[method]
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def once():
        s.grad = None
        fn().backward()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    once()  # warm-up (and, on CPU, the first touch of every buffer)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times.sort()
    return {"ms": 1000 * times[len(times) // 2], "peak_mb": peak / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop_repeats", type=int, default=1, help="Timed repeats of the (slow) pair loop.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the input logits")
    p.add_argument("--loop_limit", type=float, default=2e9,
                   help="Skip the pair loop when B·C²·H·W exceeds this (its autograd graph holds every pair).")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.case:  # child process: one measurement, printed as JSON
        method, scale = args.case.split(":")
        print(json.dumps(run_case(method, SCALES[scale], args.repeats, device, args.dtype)))
        return

    machine = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# bench_losses.py on {machine}; torch {torch.__version__}; input {args.dtype}; forward+backward, "
          f"median of {args.repeats} ({args.loop_repeats} for the loop), after one warm-up")
    header = "| scale (B, C, H, W) | method | time (ms) | peak memory (MB) | speed-up vs loop |"
    print(header)
    print("|" + "---|" * 5)
    for scale in args.scales:
        shape = SCALES[scale]
        b, c, h, w = shape
        results = {}
        for method in args.methods:
            if method == "icsd-loop" and b * c * c * h * w > args.loop_limit:
                results[method] = None
                continue
            repeats = args.loop_repeats if method == "icsd-loop" else args.repeats
            cmd = [sys.executable, __file__, "--case", f"{method}:{scale}", "--repeats", str(repeats),
                   "--device", device, "--dtype", args.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                last = (out.stderr.strip().splitlines() or ["failed"])[-1]
                results[method] = {"error": last[:80]}
                continue
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        loop = results.get("icsd-loop")
        for method in args.methods:
            r = results[method]
            label = f"{scale} ({b}, {c}, {h}, {w})"
            if r is None:
                print(f"| {label} | {method} | skipped (B·C²·N = {b * c * c * h * w:.1e} > --loop_limit) | | |")
            elif "error" in r:
                print(f"| {label} | {method} | error: {r['error']} | | |")
            else:
                speed = ""
                if method == "icsd" and loop and "ms" in loop:
                    speed = f"{loop['ms'] / r['ms']:.1f}x"
                print(f"| {label} | {method} | {r['ms']:.1f} | {r['peak_mb']:.0f} | {speed} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
