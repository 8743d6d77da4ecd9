"""Where a LoRA training step's extra time goes, layer by layer, against the kernels no exact method avoids.

    .venv/bin/python benchmarks/layer_breakdown.py            # SD-shaped UNet, `full` preset (~3 minutes)
    .venv/bin/python benchmarks/layer_breakdown.py --smoke    # tiny UNet, one round (CI)

For every distinct adapted-layer shape of the model (weighted by how often it occurs), timed in one
process, interleaved (a rotating order per round, medians over rounds):

* ``base``: the frozen layer's forward + input-gradient backward, through autograd — its share of
  the frozen floor.
* ``convlora``: the adapted layer's forward + backward as convlora runs it (``convlora.fused``).
* ``kernels``: the LoRA-only work any exact method has to do on top of the frozen layer, each at
  its fastest measured form (``T`` = batch x positions, ``r`` = rank):

  - ``dA``: the weight gradient of ``A`` — a reduction over all ``T`` into ``r`` output channels
    (conv: oneDNN's ``convolution_backward`` for ``r`` channels; linear: ``(r, T) @ (T, in)``);
  - ``dB``: ``(r, T) @ (T, out)``;
  - ``h = A x``: a separate ``r``-channel op, or riding along the frozen forward as ``r`` extra
    output channels (the extra time of ``[W; A]`` over ``W``, with the copy that makes the frozen
    part of the output contiguous again), whichever is cheaper;
  - ``g_h = B^T g``: ``(r, out) @ (out, T)``, or (linear) riding along the input gradient as
    ``g @ [W | B]``, whichever is cheaper;
  - ``dx``: LoRA's share of the input gradient, ``A^T g_h``: a separate ``r``-channel transposed
    op, or folding ``s * B A`` into the frozen weight (one pass over ``W``), whichever is cheaper.

  Neither frozen op computes a weight gradient, so ``dA`` and ``dB`` cannot ride along anything:
  they run as skinny kernels, which oneDNN/MKL run several times slower per FLOP than the wide
  frozen ones.

``bound`` = floor + sum of ``kernels`` over the adapted layers: no exact LoRA step built from
these kernels can take less than that, whatever its Python, memory traffic or path choices. The
whole-network floor and convlora step are timed too (interleaved), so the table reads as
``measured x floor`` against ``bound x floor``.

Results are printed and written as JSON (``--out``, default
``benchmarks/results/layer_breakdown.json``; the smoke run writes only where ``--out`` says).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora as bench  # noqa: E402  (the workloads, presets, rank and machine record)

from convlora.fused import conv_geometry  # noqa: E402

DEFAULT_OUT = bench.REPO / "benchmarks" / "results" / "layer_breakdown.json"
_conv_backward = torch.ops.aten.convolution_backward.default


# ---- timing --------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], object]], rounds: int, inner: int = 1) -> dict[str, list[float]]:
    """Per-call milliseconds of each function, ``rounds`` rounds in a rotating order (after one warm-up)."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3 / inner)
    return times


def _median_diff(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a - b`` (the extra time of ``a``), floored at 0."""
    return max(0.0, statistics.median(x - y for x, y in zip(a, b)))


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


# ---- one layer -----------------------------------------------------------------------------------
def _steps(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The frozen layer's and the adapted layer's forward + backward for input ``x``, output grad ``g``."""
    x = x.detach().clone().requires_grad_(True)
    is_conv = isinstance(layer, nn.modules.conv._ConvNd)

    def base() -> None:
        y = layer._conv_forward(x, layer.weight, layer.bias) if is_conv else F.linear(x, layer.weight, layer.bias)
        y.backward(g)
        x.grad = None

    def adapted() -> None:
        layer(x).backward(g)
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None

    return {"base": base, "convlora": adapted}


def _kernels(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, dict[str, Callable[[], object]]]:
    """Candidate implementations of each LoRA-only kernel (see the module doc), for timing.

    Returns ``{kernel: {form: fn}}`` with forms ``thin`` (a separate skinny op), ``fold`` (folding
    into the frozen weight) and the pair ``ride`` / ``ride:base`` (the frozen op with and without
    the ``r`` extra channels: their time difference is the cost of riding along).
    """
    A, B, W = layer.lora_A.detach(), layer.lora_B.detach(), layer.weight.detach()
    r = A.shape[0]
    if isinstance(layer, nn.Linear):
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # (T, in), (T, out)
        h_t, gh_t = torch.mm(A, x2.t()), torch.mm(B.t(), g2.t())  # (r, T)
        WA, WB = torch.cat([W, A]), torch.cat([W, B], 1)
        return {
            "dA": {"thin": lambda: torch.mm(gh_t, x2)},
            "dB": {"thin": lambda: torch.mm(h_t, g2)},
            "h": {"thin": lambda: torch.mm(A, x2.t()),
                  "ride": lambda: torch.mm(x2, WA.t())[:, :-r].contiguous(), "ride:base": lambda: torch.mm(x2, W.t())},
            "g_h": {"thin": lambda: torch.mm(B.t(), g2.t()),
                    "ride": lambda: torch.mm(g2, WB), "ride:base": lambda: torch.mm(g2, W)},
            "dx": {"thin": lambda: torch.mm(gh_t.t(), A), "fold": lambda: torch.addmm(W, B, A)},
        }
    n, c_out = x.shape[0], W.shape[0]
    geo = conv_geometry(layer)  # padding resolved as the layer's own forward resolves it
    x_padded = x if geo.pre_pad is None else F.pad(x, geo.pre_pad, mode=geo.pre_pad_mode)
    conv_args = (geo.stride, geo.padding, geo.dilation, False, [0] * (x.dim() - 2), 1)
    h = layer._conv_forward(x, A, None)  # (N, r, *S_out)
    gh = torch.randn_like(h)
    h3, g3 = h.reshape(n, r, -1), g.reshape(n, c_out, -1)
    b_t = B.reshape(c_out, r).t().expand(n, r, c_out)
    WA = torch.cat([W, A])
    return {
        "dA": {"thin": lambda: _conv_backward(gh, x_padded, A, None, *conv_args, [False, True, False])},
        "dB": {"thin": lambda: torch.bmm(h3, g3.transpose(1, 2)).sum(0)},
        "h": {"thin": lambda: layer._conv_forward(x, A, None),
              "ride": lambda: layer._conv_forward(x, WA, None)[:, :c_out].contiguous(),
              "ride:base": lambda: layer._conv_forward(x, W, None)},
        "g_h": {"thin": lambda: torch.bmm(b_t, g3)},
        "dx": {"thin": lambda: _conv_backward(gh, x_padded, A, None, *conv_args, [True, False, False]),
               "fold": lambda: torch.addmm(W.reshape(c_out, -1), B.reshape(c_out, r), A.reshape(r, -1))},
    }


def time_layer(layer: nn.Module, x: torch.Tensor, rounds: int) -> dict:
    """base / convlora / kernel timings (ms) for one adapted layer and its captured input ``x``."""
    with torch.no_grad():
        y = layer(x)
    g = torch.randn_like(y)
    steps = _steps(layer, x, g)
    step_times = interleaved(steps, rounds)
    row = {
        "base_ms": statistics.median(step_times["base"]),
        "x_base": _median_ratio(step_times["convlora"], step_times["base"]),
    }
    kernels = {}
    supported = getattr(layer, "groups", 1) == 1
    if supported:
        with torch.no_grad():
            for kernel, forms in _kernels(layer, x, g).items():
                t = interleaved(forms, rounds, inner=3)
                costs = {form: statistics.median(t[form]) for form in ("thin", "fold") if form in forms}
                if "ride" in forms:
                    costs["ride"] = _median_diff(t["ride"], t["ride:base"])
                best = min(costs, key=costs.get)
                kernels[kernel] = {"ms": costs[best], "form": best, **{f"{k}_ms": v for k, v in costs.items()}}
    row["kernels"] = kernels
    row["kernels_ms"] = sum(k["ms"] for k in kernels.values()) if supported else None
    return row


# ---- the model -----------------------------------------------------------------------------------
def adapted_layer_inputs(model: nn.Module, call: Callable[[], object]) -> dict[tuple, list]:
    """``{(kind, x shape, weight shape, stride): [layer, x, count]}`` from one forward pass."""
    seen: dict[tuple, list] = {}

    def hook(module, inputs, _output):
        x = inputs[0]
        key = (type(module).__name__, tuple(x.shape), tuple(module.weight.shape), tuple(getattr(module, "stride", ())))
        if key not in seen:
            seen[key] = [module, x.detach().clone(), 0]
        seen[key][2] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if hasattr(m, "lora_A")]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return seen


def run(args) -> dict:
    torch.manual_seed(0)
    w = bench.workloads(args.smoke)[args.model]()
    floor = bench._freeze(w.build().eval())
    model = bench._convlora(floor, w.presets[args.preset]).train()  # a copy, A and B random
    inputs = w.inputs()

    layers = adapted_layer_inputs(model, lambda: w.call(model, inputs))
    rows = []
    for (kind, x_shape, w_shape, stride), (layer, x, count) in sorted(layers.items(), key=lambda kv: -kv[1][2]):
        row = {"kind": kind, "x": list(x_shape), "weight": list(w_shape), "stride": list(stride), "count": count}
        row.update(time_layer(layer, x, args.rounds))
        rows.append(row)
        print(_row_line(row), flush=True)

    whole = interleaved({
        "floor": lambda: (bench._train_step(w, floor, inputs), bench._reset_grads(floor)),
        "convlora": lambda: (bench._train_step(w, model, inputs), bench._reset_grads(model)),
    }, args.rounds)
    floor_ms = statistics.median(whole["floor"])
    base_total = sum(r["count"] * r["base_ms"] for r in rows)
    extra_total = sum(r["count"] * r["base_ms"] * (r["x_base"] - 1) for r in rows)
    kernel_total = sum(r["count"] * r["kernels_ms"] for r in rows if r["kernels_ms"] is not None)
    totals = {
        "floor_ms": floor_ms,
        "convlora_x_floor": _median_ratio(whole["convlora"], whole["floor"]),
        "adapted_layers_base_ms": base_total,
        "adapted_layers_extra_ms": extra_total,
        "kernels_ms": kernel_total,
        "kernels_by_name_ms": {
            k: sum(r["count"] * r["kernels"][k]["ms"] for r in rows if k in r["kernels"]) for k in ("dA", "dB", "h", "g_h", "dx")
        },
        "bound_x_floor": (floor_ms + kernel_total) / floor_ms,
        "layers_x_floor": (floor_ms + extra_total) / floor_ms,
    }
    return {
        "command": "python benchmarks/layer_breakdown.py " + " ".join(args.argv),
        "started_utc": args.started,
        "machine": bench.machine(torch.device("cpu"), args.threads),
        "settings": {"model": args.model, "description": w.description, "preset": args.preset, "rank": bench.RANK,
                     "alpha": bench.ALPHA, "rounds": args.rounds, "smoke": args.smoke},
        "layers": rows,
        "totals": totals,
    }


def _row_line(row: dict) -> str:
    k = row["kernels"]
    parts = " ".join(f"{name} {v['ms']:.2f}{dict(ride='r', fold='f').get(v['form'], '')}" for name, v in k.items())
    kernels = "" if row["kernels_ms"] is None else f"kernels x{1 + row['kernels_ms'] / row['base_ms']:.2f} ({parts})"
    shape = f"x{tuple(row['x'])} w{tuple(row['weight'])}" + (f" s{tuple(row['stride'])}" if any(s != 1 for s in row["stride"]) else "")
    return f"{row['count']:3d} {row['kind']:6s} {shape:44s} base {row['base_ms']:7.2f} ms  convlora x{row['x_base']:.2f}  {kernels}"


def summary(report: dict) -> str:
    t = report["totals"]
    by = ", ".join(f"{k} {v:.0f}" for k, v in t["kernels_by_name_ms"].items())
    return "\n".join([
        f"whole step: floor {t['floor_ms']:.0f} ms, convlora x{t['convlora_x_floor']:.2f} floor",
        f"adapted layers: base {t['adapted_layers_base_ms']:.0f} ms of the floor; convlora adds "
        f"{t['adapted_layers_extra_ms']:.0f} ms (floor + that = x{t['layers_x_floor']:.2f})",
        f"LoRA-only kernels at their best: {t['kernels_ms']:.0f} ms ({by}) -> bound x{t['bound_x_floor']:.2f} floor",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny UNet, one round (CI: checks that it runs)")
    parser.add_argument("--model", default=None, help="workload of bench_lora.py (default unet-sd; smoke unet-tiny)")
    parser.add_argument("--preset", default="full", help="LoRA target preset of the workload (default full)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9; smoke 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2; smoke 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON path (default {DEFAULT_OUT.relative_to(bench.REPO)}; smoke: none)")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.model = args.model or ("unet-tiny" if args.smoke else "unet-sd")
    args.rounds = args.rounds or (1 if args.smoke else 9)
    args.threads = args.threads or (1 if args.smoke else 2)
    if args.out is None and not args.smoke:
        args.out = DEFAULT_OUT
    args.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    table = bench.workloads(args.smoke)
    if args.model not in table:
        raise SystemExit(f"unknown workload {args.model!r}; choose from {list(table)}")
    if args.preset not in table[args.model]().presets:
        raise SystemExit(f"unknown preset {args.preset!r} for {args.model}")
    torch.set_num_threads(args.threads)
    report = run(args)
    print(summary(report))
    if args.out is not None:
        bench.write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
