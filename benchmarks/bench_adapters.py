"""What the layer adds around the fused LoRA kernels, and what a second active adapter costs, in one process.

    .venv/bin/python benchmarks/bench_adapters.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_adapters.py --smoke    # seconds

For a training step (forward + backward of ``mean(out**2)``, only the adapter trains) on a Linear and
a 3x3 Conv2d, each variant timed round-robin over ``--repeats`` rounds:

* ``kernel``: the fused autograd function (:mod:`convlora.fused`) called directly with the layer's
  tensors: the floor for a single adapter.
* ``layer, 1 adapter``: the same step through the LoRA layer's ``forward`` (its dispatch: the active
  adapter, the fused-path checks), which must stay close to ``kernel``.
* ``layer, 2 adapters``: two active adapters (the second frozen), their branches added unfused.

Ratios are medians of per-round ratios against ``kernel``. The script uses only API that a
single-adapter convlora also has, so the same file measures an older checkout
(``PYTHONPATH=<checkout> python benchmarks/bench_adapters.py``) for a before / after comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import convlora
from convlora import fused


def _cases(smoke: bool) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    if smoke:
        return {"linear 64": (nn.Linear(64, 64), (32, 64)), "conv3x3 16": (nn.Conv2d(16, 16, 3, padding=1), (1, 16, 8, 8))}
    return {
        "linear 320 (T=256)": (nn.Linear(320, 320), (256, 320)),
        "conv3x3 64 (16x16)": (nn.Conv2d(64, 64, 3, padding=1), (2, 64, 16, 16)),
    }


def _kernel_step(layer: nn.Module, x: torch.Tensor):
    """One fused call with the layer's own tensors (no layer dispatch)."""
    if isinstance(layer, nn.Linear):
        fold = fused.use_fold(layer.weight, x.numel(), x.shape[0] * layer.out_features, spatial=False)
        return lambda: fused._LinearLoRAFunction.apply(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, fold)
    geo = fused.conv_geometry(layer)
    y_numel = x.shape[0] * layer.out_channels * x.shape[2] * x.shape[3]
    fold = fused.use_fold(layer.weight, x.numel(), y_numel, spatial=True)
    args = (geo.stride, geo.padding, geo.dilation, geo.groups)
    return lambda: fused._ConvLoRAFunction.apply(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, args, fold)


def _timed(run, params) -> float:
    for p in params:
        p.grad = None
    start = time.perf_counter()
    run().square().mean().backward()
    return time.perf_counter() - start


def measure(base: nn.Module, shape: tuple[int, ...], repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    one = nn.Sequential(base)
    convlora.inject_lora(one, convlora.LoRAConfig(r=8, target_modules=["0"]))
    convlora.mark_only_lora_as_trainable(one)
    x = torch.randn(shape)
    layer = one[0]
    params = [layer.lora_A, layer.lora_B]
    variants = {"kernel": _kernel_step(layer, x), "layer, 1 adapter": lambda: one(x)}
    if hasattr(convlora, "set_adapters"):
        two = nn.Sequential(base)
        convlora.inject_lora(two, convlora.LoRAConfig(r=8, target_modules=["0"]), adapter_name="a")
        convlora.inject_lora(two, convlora.LoRAConfig(r=8, target_modules=["0"]), adapter_name="b")
        convlora.mark_only_lora_as_trainable(two, adapter_name="a")
        convlora.set_adapters(two, ["a", "b"])
        params += [two[0].lora_adapters["a"].lora_A, two[0].lora_adapters["a"].lora_B]
        variants["layer, 2 adapters"] = lambda: two(x)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(warmup + repeats):
        order = list(variants)[round_ % len(variants):] + list(variants)[: round_ % len(variants)]
        for name in order:
            elapsed = _timed(variants[name], params)
            if round_ >= warmup:
                times[name].append(elapsed)
    kernel = times["kernel"]
    return {
        name: {"median_us": statistics.median(t) * 1e6,
               "ratio_to_kernel": statistics.median(a / b for a, b in zip(t, kernel))}
        for name, t in times.items()
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 400; smoke 5)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (default: none)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    repeats = args.repeats or (5 if args.smoke else 400)
    results = {name: measure(base, shape, repeats, warmup=2 if args.smoke else 20)
               for name, (base, shape) in _cases(args.smoke).items()}
    torch.set_num_threads(threads)
    results["_meta"] = {"convlora": str(Path(convlora.__file__).parent), "torch": torch.__version__,
                        "threads": 1, "repeats": repeats, "loadavg": open("/proc/loadavg").read().split()[:3]}
    for name, rows in results.items():
        if name != "_meta":
            print(name)
            for variant, row in rows.items():
                print(f"  {variant:<20}{row['median_us']:>10.1f} us{row['ratio_to_kernel']:>8.3f}x kernel")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
