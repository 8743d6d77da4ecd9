"""Adapter kinds at matched trainable parameters: LoRA, DoRA, LoHa and LoKr on the SD-shaped UNet of
bench_lora.py, their parameter counts and training-step times as ratios to LoRA, in one process.

    .venv/bin/python benchmarks/adapter_kinds.py            # unet-sd, preset full (~5 minutes on 1 core)
    .venv/bin/python benchmarks/adapter_kinds.py --smoke    # unet-tiny, 1 round: seconds (a fast test)

Every kind adapts the same modules (``unet_lora_config(preset)``). The reference is LoRA rank
``--rank`` (8); each other kind gets the rank (LoKr: rank and ``factor``) whose trainable parameter
count is nearest LoRA's, counted from the injected model and written to the JSON:

* DoRA: the same rank (its magnitudes add one parameter per output channel, a few percent);
* LoHa: half the rank (two LoRA-sized pairs, so exactly LoRA's count at even ranks);
* LoKr: the (factor, rank) pair nearest in count, searched over factors 2, 4, 8, 16 and -1 and ranks
  1-64 from LyCORIS's shape rule (:func:`convlora.kinds.lokr_shapes`). Factor 1 is left out: its
  W1 is a 1x1 scalar, so it is LoRA times a trained number.

**Training step** = forward, backward of ``mean(out**2)`` (the input requires grad) and an AdamW
step on the adapter's parameters, gradients set to None after each step (outside the timed region).
Variants are built first, then run interleaved: ``--warmup`` untimed steps each, then ``--repeats``
rounds in a rotating order. A kind's ratio is the median over rounds of its step time / LoRA's step
time in the same round (seconds apart, which cancels most of the drift from other jobs on shared
cores); the medians, minimum and CPU time (``time.process_time``) are recorded, with the load
average before and after. Written as JSON to ``--out`` (default ``benchmarks/results/adapter_kinds.json``;
the smoke run writes only where ``--out`` says).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora as bench

import convlora
from convlora.diffusion import unet_lora_config
from convlora.kinds import lokr_shapes

DEFAULT_OUT = bench.REPO / "benchmarks" / "results" / "adapter_kinds.json"
LOKR_FACTORS = (2, 4, 8, 16, -1)
LOKR_RANKS = range(1, 65)


def adapted(base: torch.nn.Module, config: convlora.LoRAConfig) -> torch.nn.Module:
    """A copy of the frozen ``base`` with ``config``'s adapters injected, only they trainable."""
    model = copy.deepcopy(base)
    convlora.inject_lora(model, config)
    convlora.mark_only_lora_as_trainable(model)
    return model


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in convlora.adapter_parameters(model).values())


def matched_configs(base: torch.nn.Module, preset: str, rank: int) -> dict[str, tuple[convlora.LoRAConfig, dict]]:
    """Name -> (config, its kind settings) for LoRA rank ``rank`` and each other kind at the nearest
    trainable parameter count (see the module docstring)."""
    lora = unet_lora_config(preset, rank=rank)
    reference = adapted(base, lora)
    delta_shapes = [tuple(layer.dense_base_weight().shape) for layer in convlora.lora_layers(reference).values()]
    target = trainable(reference)

    def lokr_count(r: int, factor: int) -> int:
        return sum(sum(math.prod(s) for s in lokr_shapes(shape, r, factor).values()) for shape in delta_shapes)

    lokr_rank, factor = min(((r, f) for f in LOKR_FACTORS for r in LOKR_RANKS),
                            key=lambda rf: (abs(lokr_count(*rf) - target), rf[0]))
    loha_rank = max(1, round(rank / 2))
    return {
        f"lora r{rank}": (lora, {"kind": "lora", "rank": rank}),
        f"dora r{rank}": (dataclasses.replace(lora, kind="dora"), {"kind": "dora", "rank": rank}),
        f"loha r{loha_rank}": (dataclasses.replace(unet_lora_config(preset, rank=loha_rank), kind="loha"),
                               {"kind": "loha", "rank": loha_rank}),
        f"lokr r{lokr_rank} f{factor}": (dataclasses.replace(unet_lora_config(preset, rank=lokr_rank), kind="lokr", factor=factor),
                                         {"kind": "lokr", "rank": lokr_rank, "factor": factor}),
    }


def train_step(w: bench.Workload, model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: tuple) -> None:
    """Forward, backward of ``mean(out**2)`` through an input that requires grad, one optimizer step."""
    x, *rest = inputs
    out = w.call(model, (x.detach().requires_grad_(True), *rest))
    out.float().square().mean().backward()
    optimizer.step()


def run(w: bench.Workload, args) -> dict:
    """Build every kind on ``w``'s model, time their training steps interleaved; the per-kind rows."""
    base = bench._freeze(w.build())
    configs = matched_configs(base, args.preset, args.rank)
    models = {name: adapted(base, config) for name, (config, _) in configs.items()}
    optimizers = {name: torch.optim.AdamW(list(convlora.adapter_parameters(m).values()), lr=1e-4) for name, m in models.items()}
    inputs = w.inputs()
    names = list(models)

    def step(name: str) -> tuple[float, float]:
        wall, cpu = bench._timed(lambda: train_step(w, models[name], optimizers[name], inputs), torch.device("cpu"))
        optimizers[name].zero_grad(set_to_none=True)
        return wall, cpu

    for _ in range(args.warmup):
        for name in names:
            step(name)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_index in range(args.repeats):
        shift = round_index % len(names)  # rotate the order so no kind always runs first
        for name in names[shift:] + names[:shift]:
            samples[name].append(step(name))
    summaries = {name: bench._summary(samples[name]) for name in names}
    reference, counts = summaries[names[0]], {name: trainable(m) for name, m in models.items()}
    rows = {}
    for name in names:
        summary = summaries[name]
        rows[name] = {**configs[name][1], "trainable_parameters": counts[name],
                      "parameters_x_lora": round(counts[name] / counts[names[0]], 4), **summary,
                      "step_x_lora": paired_ratio(summary["ms_all"], reference["ms_all"]),
                      "step_x_lora_cpu": paired_ratio(summary["cpu_ms_all"], reference["cpu_ms_all"])}
    return rows


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of ``time / reference time`` of the same round."""
    return statistics.median(a / b for a, b in zip(times, reference))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="the tiny UNet, 1 round, no warm-up: checks that it all runs")
    p.add_argument("--preset", default="full", choices=["attn", "attn-ff", "full"], help="the UNet layers every kind adapts")
    p.add_argument("--rank", type=int, default=8, help="the LoRA reference's rank")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 12; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per kind first (default 2; smoke 0)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: the cores are shared)")
    p.add_argument("--out", type=Path, default=None, help="JSON results path (default benchmarks/results/adapter_kinds.json; smoke: none)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.smoke else 12)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 2)
    if args.out is None and not args.smoke:
        args.out = DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = "unet-tiny" if args.smoke else "unet-sd"
    w = bench.workloads(args.smoke)[model]()
    print(f"[{model}] {w.description}", file=sys.stderr, flush=True)
    load_before, started = bench._load(), _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    rows = run(w, args)
    report = {
        "command": "python benchmarks/adapter_kinds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_utc": started,
        "machine": bench.machine(torch.device("cpu"), args.threads),
        "settings": {"model": model, "description": w.description, "preset": args.preset, "rank": args.rank,
                     "repeats": args.repeats, "warmup": args.warmup, "smoke": args.smoke,
                     "step": "forward + backward of mean(out**2), input requires grad, AdamW step on the adapter"},
        "load_before": load_before, "load_after": bench._load(), "kinds": rows,
    }
    for name, row in rows.items():
        print(f"{name:>14}: {row['trainable_parameters']:>9,} parameters (x{row['parameters_x_lora']:.3f}), step "
              f"{row['ms_median']:.0f} ms median, x{row['step_x_lora']:.2f} LoRA (cpu x{row['step_x_lora_cpu']:.2f})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
