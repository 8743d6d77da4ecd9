"""Which SVD route `convlora resize` / `merge-loras --rank` / `extract` should use: time and accuracy.

    .venv/bin/python benchmarks/svd_routes.py            # a 1280x1280x3x3 conv, rank 128 -> 64 (~1 minute)
    .venv/bin/python benchmarks/svd_routes.py --smoke    # small shapes, one round (CI)

Accuracy is against the best rank-k approximation (Eckart–Young) from a float64 full SVD:
``error = ‖ΔW_k(route) − ΔW_k(best)‖_F / ‖ΔW_k(best)‖_F``; the project's bound is 1e-4. Times are
medians over rounds, all routes interleaved in one process, one torch thread unless ``--threads``;
``x_full`` is the ratio to the full float32 SVD of the dense matrix.

* ``factored`` (a LoRA's ΔW = s·B@A, rank r): full SVD of the dense ΔW; ``svd_lowrank`` of the
  dense ΔW (q = k + 10, niter 2); convlora's QR-of-the-factors route
  (:func:`convlora.lowrank.factored_svd`, including forming nothing dense).
* ``dense`` (extract: a full-rank difference, a decaying spectrum σ_i ∝ 1/i plus noise): full SVD;
  ``svd_lowrank`` with niter 2 and 6.

Results are printed and written as JSON (``--out``, default ``benchmarks/results/svd_routes.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora as bench  # noqa: E402  (the machine record)

from convlora.lowrank import factored_svd  # noqa: E402

DEFAULT_OUT = bench.REPO / "benchmarks" / "results" / "svd_routes.json"
Route = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def truncation(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> torch.Tensor:
    """``U_k diag(S_k) Vh_k`` in float64, ``(m, n)``."""
    return (u[:, :k].double() * s[:k].double()) @ vh[:k].double()


def measure(routes: dict[str, Route], best: torch.Tensor, k: int, rounds: int) -> dict[str, dict]:
    """Median time per route (interleaved rounds) and its truncation's error against ``best``."""
    times: dict[str, list[float]] = {name: [] for name in routes}
    errors = {}
    for i in range(rounds):
        for name, route in (list(routes.items())[i % len(routes):] + list(routes.items())[: i % len(routes)]):
            start = time.perf_counter()
            u, s, vh = route()
            times[name].append(time.perf_counter() - start)
            errors[name] = float((truncation(u, s, vh, k) - best).norm() / best.norm())
    full = statistics.median(times[next(iter(routes))])
    return {name: {"ms_median": 1e3 * statistics.median(t), "x_full": statistics.median(t) / full,
                   "relative_error": errors[name], "within_1e-4": errors[name] <= 1e-4}
            for name, t in times.items()}  # fmt: skip


def factored_case(c_out: int, c_in: int, kernel: int, r: int, k: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    lora_a = torch.randn(r, c_in, kernel, kernel, generator=g) / (c_in * kernel * kernel) ** 0.5
    lora_b = torch.randn(c_out, r, 1, 1, generator=g) / r**0.5
    dense = (lora_b.flatten(1) @ lora_a.flatten(1))  # (C_out, C_in * k * k), scaling 1
    best = truncation(*torch.linalg.svd(dense.double(), full_matrices=False), k)
    routes = {
        "full svd (dense, float32)": lambda: torch.linalg.svd(lora_b.flatten(1) @ lora_a.flatten(1), full_matrices=False),
        "svd_lowrank q=k+10 niter=2 (dense)": lambda: _lowrank(lora_b.flatten(1) @ lora_a.flatten(1), k + 10, 2),
        "factored QR + r x r SVD": lambda: factored_svd(lora_a, lora_b, 1.0),
    }
    return {"shape": [c_out, c_in, kernel, kernel], "lora_rank": r, "target_rank": k, "routes": measure(routes, best, k, rounds)}


def dense_case(m: int, n: int, k: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(1)
    q = min(m, n)
    u = torch.linalg.qr(torch.randn(m, q, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, q, generator=g, dtype=torch.float64))[0]
    spectrum = 1.0 / torch.arange(1, q + 1, dtype=torch.float64)
    delta = ((u * spectrum) @ v.T + 1e-4 * torch.randn(m, n, generator=g, dtype=torch.float64)).float()
    best = truncation(*torch.linalg.svd(delta.double(), full_matrices=False), k)
    routes = {
        "full svd (float32)": lambda: torch.linalg.svd(delta, full_matrices=False),
        "svd_lowrank q=k+10 niter=2": lambda: _lowrank(delta, k + 10, 2),
        "svd_lowrank q=k+10 niter=6": lambda: _lowrank(delta, k + 10, 6),
    }
    return {"shape": [m, n], "target_rank": k, "spectrum": "1/i + 1e-4 noise", "routes": measure(routes, best, k, rounds)}


def _lowrank(matrix: torch.Tensor, q: int, niter: int):
    torch.manual_seed(0)
    u, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
    return u, s, v.T


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small shapes, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on the shared 2-core machine a second thread only waits)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 1 if args.smoke else args.rounds
    if args.smoke:
        cases = {"factored": factored_case(64, 64, 3, 16, 8, rounds), "dense": dense_case(64, 576, 8, rounds)}
    else:
        cases = {"factored": factored_case(1280, 1280, 3, 128, 64, rounds), "dense": dense_case(1280, 11520, 64, rounds)}
    report = {"machine": bench.machine(torch.device("cpu"), torch.get_num_threads()),
              "settings": {"smoke": args.smoke, "rounds": rounds}, "cases": cases}  # fmt: skip
    print(json.dumps(cases, indent=2))
    out = args.out or (None if args.smoke else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
