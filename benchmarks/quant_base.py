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

Writes JSON (``--out``, default ``benchmarks/results/quant_base.json``; ``--smoke`` writes only where
``--out`` says).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
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
    return "\n".join(lines)


if __name__ == "__main__":
    main()
