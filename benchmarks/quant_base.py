"""A quantized frozen UNet: its accuracy and its frozen-weight bytes, per base precision, in one process.

    .venv/bin/python benchmarks/quant_base.py            # the README tables
    .venv/bin/python benchmarks/quant_base.py --smoke    # the tiny UNet only: seconds (tests)

* **accuracy**: the UNet's output with its Linear and Conv weights stored in each precision against
  the float32 UNet, ``‖out_q − out‖ / ‖out‖`` on fixed random inputs (two timesteps, 10 and 500).
  The UNets are randomly initialised (no pretrained weights can be downloaded here), so these are
  the errors of the storage formats on initialisation-scale weights, not of a trained model.
* **frozen bytes**: what the Linear and Conv weights take, split into Linear, 1×1 conv and k×k conv,
  against the same weights in bf16. Sizes come from the shapes (:func:`convlora.quant.quantized_nbytes`,
  tested equal to the real storage), so the SD-1.5-sized UNet is built on the meta device.
  The peer row is bitsandbytes' ``Linear4bit`` as PEFT and diffusers use it: Linear layers in NF4
  (the same layout, plus two code books per layer that bitsandbytes keeps in each QuantState),
  convolutions left in bf16.

* **training** (SD-shaped UNet, LoRA r=8 on the ``full`` preset, convlora's variants against PEFT on
  bitsandbytes ``Linear4bit`` with the convs in float32, as a peer must keep them without autocast):
  frozen storage (every frozen parameter and buffer), the memory a training step adds (bench_lora's
  ``saved for backward + grads``, the distinct tensor storages autograd keeps, and peak RSS), and
  the step time (forward + backward, median of ``--repeats`` interleaved rounds) relative to the
  float32 base. Compute is float32 throughout, so the rows differ only in how the base is stored.

Writes JSON (``--out``, default ``benchmarks/results/quant_base.json``; ``--smoke`` writes only where
``--out`` says).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lora as bench  # noqa: E402  (the UNet workloads and the machine record)

from convlora.quant import QUANT_MODES, quantize_base, quantized_nbytes  # noqa: E402

#: bitsandbytes keeps NF4's 16 levels and the 256-level map of the block scales in each layer's QuantState.
BNB_CODE_BOOK_BYTES = (16 + 256) * 4
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    sample_size=64, in_channels=4, out_channels=4,
)


def accuracy(workload: bench.Workload) -> dict[str, float]:
    """Relative output error of the UNet stored in each precision (bf16 / fp16: the whole UNet cast)."""
    torch.manual_seed(0)
    base = workload.build().requires_grad_(False).eval()
    inputs = workload.inputs()
    with torch.no_grad():
        ref = workload.call(base, inputs)
        errors = {}
        for dtype in (torch.bfloat16, torch.float16):
            cast = copy.deepcopy(base).to(dtype)
            out = workload.call(cast, tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)).float()
            errors[str(dtype).replace("torch.", "")] = _relative(out, ref)
        for mode in QUANT_MODES:
            quantized = copy.deepcopy(base)
            quantize_base(quantized, mode)
            errors[mode] = _relative(workload.call(quantized, inputs), ref)
    return errors


def training(workload: bench.Workload, repeats: int, warmup: bool = True) -> dict[str, dict[str, float]]:
    """Frozen MiB, step memory and step time per base storage (see the module docstring); ``warmup``:
    one untimed round first."""
    torch.manual_seed(0)
    base = workload.build().requires_grad_(False)
    targets = workload.presets["full"]
    models = {}
    for name, mode in (("fp32", None), ("bf16 storage", "bf16"), ("fp8", "fp8"), ("int8", "int8"), ("nf4", "nf4")):
        model = bench._convlora(copy.deepcopy(base), targets)
        if mode:
            quantize_base(model, mode)
        models[f"convlora {name}"] = model.train()
    models["peft + bitsandbytes Linear4bit"] = _peft_on_linear4bit(base, workload.presets["full"], models["convlora fp32"]).train()
    inputs, cpu = workload.inputs(), torch.device("cpu")
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(repeats + warmup):  # with warmup, round 0 is untimed
        for name, model in models.items():
            wall, _ = bench._timed(lambda: bench._train_step(workload, model, inputs), cpu)
            bench._reset_grads(model)
            if round_ or not warmup:
                times[name].append(wall)
    rows = {}
    for name, model in models.items():
        memory = bench.measure_memory(workload, model, inputs, cpu)
        rows[name] = {"frozen_mib": _frozen_bytes(model) / 2**20, "ms_median": 1000 * statistics.median(times[name]), **memory}
    reference = rows["convlora fp32"]
    for row in rows.values():
        row["x_fp32_time"] = row["ms_median"] / reference["ms_median"]
        row["x_fp32_frozen"] = row["frozen_mib"] / reference["frozen_mib"]
    return rows


def _frozen_bytes(model: nn.Module) -> int:
    """Every frozen parameter and buffer, each storage once (quantized weights are buffers)."""
    storages = {}
    for t in [p for p in model.parameters() if not p.requires_grad] + list(model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _peft_on_linear4bit(base: nn.Module, targets, like: nn.Module) -> nn.Module:
    """PEFT LoRA (A and B copied from ``like``) on ``base`` with its Linear layers as bitsandbytes ``Linear4bit``."""
    import bitsandbytes as bnb

    model = copy.deepcopy(base)
    for path, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
            quantized.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
            if module.bias is not None:
                quantized.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, quantized.to("cpu"))
    return bench._peft(model, targets, like)


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def frozen_bytes(model: nn.Module) -> dict[str, dict[str, float]]:
    """Bytes of the Linear / 1×1-conv / k×k-conv weights per storage, and each total's ratio to bf16."""
    kinds: dict[str, list[tuple[int, ...]]] = {"linear": [], "conv1x1": [], "convkxk": []}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            kinds["linear"].append(tuple(module.weight.shape))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = any(k > 1 for k in module.kernel_size)
            kinds["convkxk" if spatial else "conv1x1"].append(tuple(module.weight.shape))

    def size(mode: str, shape: tuple[int, ...]) -> int:
        numel = 1
        for d in shape:
            numel *= d
        return {"fp32": 4 * numel, "bf16": 2 * numel}.get(mode) or quantized_nbytes(mode, shape)

    rows = {}
    for mode in ("fp32", "bf16", *reversed(QUANT_MODES)):
        rows[mode] = {kind: sum(size(mode, s) for s in shapes) for kind, shapes in kinds.items()}
    rows["bitsandbytes Linear4bit (PEFT / diffusers)"] = {
        "linear": sum(quantized_nbytes("nf4", s) + BNB_CODE_BOOK_BYTES for s in kinds["linear"]),
        "conv1x1": rows["bf16"]["conv1x1"],
        "convkxk": rows["bf16"]["convkxk"],
    }
    bf16_total = sum(rows["bf16"].values())
    for row in rows.values():
        row["total"] = sum(row.values())
        row["x_bf16"] = row["total"] / bf16_total
    counts = {kind: sum(_numel(s) for s in shapes) for kind, shapes in kinds.items()}
    rows["weights"] = {**counts, "total": sum(counts.values())}
    return rows


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _sd15_on_meta() -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny UNet only (seconds)")
    parser.add_argument("--repeats", type=int, default=3, help="timed training rounds (smoke: 1)")
    parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/quant_base.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    names = ["unet-tiny"] if args.smoke else ["unet-tiny", "unet-sd"]
    table = bench.workloads(smoke=args.smoke)
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": bench.machine(torch.device("cpu"), torch.get_num_threads()), "accuracy": {}, "frozen_bytes": {}}
    for name in names:
        workload = table[name]()
        result["accuracy"][name] = accuracy(workload)
        result["frozen_bytes"][name] = frozen_bytes(workload.build())
    if not args.smoke:
        result["frozen_bytes"]["unet-sd15 (meta)"] = frozen_bytes(_sd15_on_meta())
    train_on = "unet-tiny" if args.smoke else "unet-sd"
    result["training"] = {train_on: training(table[train_on](), 1 if args.smoke else args.repeats, warmup=not args.smoke)}
    print(format_tables(result))
    out = args.out or (None if args.smoke else REPO / "benchmarks/results/quant_base.json")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_tables(result: dict) -> str:
    lines = ["| UNet | " + " | ".join(next(iter(result["accuracy"].values()))) + " |"]
    lines.append("|---|" + "---:|" * len(next(iter(result["accuracy"].values()))))
    for name, errors in result["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errors.values()) + " |")
    for name, rows in result["frozen_bytes"].items():
        w = rows["weights"]
        lines += ["", f"{name}: {w['total'] / 1e6:.1f}M weights (Linear {w['linear'] / w['total']:.0%}, "
                      f"1x1 conv {w['conv1x1'] / w['total']:.0%}, kxk conv {w['convkxk'] / w['total']:.0%})",
                  "| frozen base | Linear MiB | 1x1 conv MiB | kxk conv MiB | total MiB | x bf16 |", "|---|---:|---:|---:|---:|---:|"]
        for mode, row in rows.items():
            if mode != "weights":
                lines.append(f"| {mode} | {row['linear'] / 2**20:.1f} | {row['conv1x1'] / 2**20:.1f} | "
                             f"{row['convkxk'] / 2**20:.1f} | {row['total'] / 2**20:.1f} | {row['x_bf16']:.3f} |")
    for name, rows in result.get("training", {}).items():
        lines += ["", f"training step on {name} (LoRA r=8, full preset, float32 compute)",
                  "| base | frozen MiB | x fp32 | saved+grads MiB | peak RSS delta MiB | step ms | x fp32 time |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for variant, row in rows.items():
            rss = row.get("peak_rss_delta_mib")
            lines.append(f"| {variant} | {row['frozen_mib']:.1f} | {row['x_fp32_frozen']:.3f} | {row.get('saved_plus_grads_mib', 0):.1f} | "
                         f"{'' if rss is None else f'{rss:.0f}'} | {row['ms_median']:.0f} | {row['x_fp32_time']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
