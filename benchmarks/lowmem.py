"""Peak memory and step time of LoRA training with each low-memory option, in one process.

    .venv/bin/python benchmarks/lowmem.py            # SD-shaped UNet + a 12-layer CLIP text encoder (~2 minutes)
    .venv/bin/python benchmarks/lowmem.py --smoke    # tiny UNet and text encoder, one step each (CI)

One training step = the frozen text encoder's forward (no grad) + the UNet forward + backward with
LoRA (``full`` preset, rank 8) + the optimizer step, batch 2. Variants, each built fresh from the same
base weights in the same process:

* ``baseline``: AdamW, the text encoder runs every step;
* ``+ gradient checkpointing``: the UNet's blocks recomputed in backward
  (:func:`convlora.training.activation_checkpointing.enable_gradient_checkpointing`);
* ``+ 8-bit Adam``: bitsandbytes' AdamW8bit (8-bit state for LoRA tensors of >= 4096 elements);
* ``+ cached text embeddings``: the prompts encoded once
  (:class:`convlora.training.text_cache.TextEmbeddingCache`), the text encoder deleted;
* ``all three``.

Memory, two measures:

* CPU ``peak RSS`` (MiB): the process's resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the variant is built) minus the resident set then, so it
  holds everything the variant allocates -- weights, optimizer state, activations -- at its peak
  during a training step. tracemalloc cannot see torch's allocations; the RSS sees them all, with
  the allocator's caching (noise of a few MiB). On CUDA: ``torch.cuda.max_memory_allocated`` over
  the same span, minus the allocation before.
* ``accounted`` (MiB, exact bytes, the primary measure): what the variant keeps between steps
  (``held``: every parameter, the optimizer state, the text encoder or the cached embeddings) + the
  tensors autograd saves for backward (``saved_tensors_hooks``; inside a non-reentrant checkpoint
  those are dropped and recomputed, so they do not count) + the LoRA gradients. Kernel workspaces
  are not in it.

The RSS peak is biased downwards for every variant after the first: pages the earlier variants
freed stay resident in the heap (``malloc_trim`` returns only part of them), and a later variant
reuses them without raising the high-water mark. Read it for the first row, and the accounted
column for the ratios.

Step time: the median of the timed steps (after warm-up steps that also create the optimizer
state). Ratios are to ``baseline``, taken in this one process. JSON goes to ``--out`` (default
``benchmarks/results/lowmem.json``; the smoke run writes only where ``--out`` says).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora as bench  # noqa: E402  (the SD-shaped UNet workloads, RSS helpers and machine record)

from convlora import inject_lora, mark_only_lora_as_trainable  # noqa: E402
from convlora.diffusion import unet_lora_config  # noqa: E402
from convlora.diffusion.families import SD  # noqa: E402
from convlora.diffusion.tiny import load_tiny_tokenizer, tiny_text_encoder_config  # noqa: E402
from convlora.training.activation_checkpointing import enable_gradient_checkpointing  # noqa: E402
from convlora.training.text_cache import TextEmbeddingCache  # noqa: E402

DEFAULT_OUT = bench.REPO / "benchmarks" / "results" / "lowmem.json"
PROMPTS = ["a photo of a sks bag", "a photo of a trouser"]
#: name -> (gradient checkpointing, 8-bit Adam, cached text embeddings)
VARIANTS = {
    "baseline": (False, False, False),
    "+ gradient checkpointing": (True, False, False),
    "+ 8-bit Adam": (False, True, False),
    "+ cached text embeddings": (False, False, True),
    "all three": (True, True, True),
}


@dataclass
class Setup:
    """The base models (never trained) and the inputs every variant gets."""

    unet: nn.Module
    text_encoder: nn.Module
    ids: dict[str, torch.Tensor]
    latents: torch.Tensor
    timesteps: torch.Tensor
    description: str


def build_setup(smoke: bool, device: torch.device) -> Setup:
    """The SD-shaped UNet of bench_lora (tiny with --smoke) and a CLIP text encoder whose width is the
    UNet's cross-attention dim (12 layers; the tiny one with --smoke)."""
    from transformers import CLIPTextModel

    workload = bench.workloads(smoke)["unet-tiny" if smoke else "unet-sd"]()
    torch.manual_seed(0)
    unet = workload.build().to(device).requires_grad_(False)
    tokenizer = load_tiny_tokenizer()
    config = tiny_text_encoder_config(tokenizer)
    width = unet.config.cross_attention_dim
    if not smoke:
        config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads = width, 4 * width, 12, 8
    text_encoder = CLIPTextModel(config).to(device).requires_grad_(False).eval()
    latents, timesteps, _ = workload.inputs()
    ids = SD.tokenize({"tokenizer": tokenizer})(PROMPTS)
    description = (f"{workload.description.split(';')[0]}; CLIPTextModel {config.num_hidden_layers} layers x {width}; "
                   f"LoRA full preset r={bench.RANK}; batch {len(PROMPTS)}, latents {tuple(latents.shape)}")
    return Setup(unet, text_encoder, {k: v.to(device) for k, v in ids.items()}, latents.to(device), timesteps.to(device), description)


def build_variant(setup: Setup, checkpointing: bool, adam8bit: bool, cached: bool):
    """``step()`` of one variant and the tensors it holds between steps."""
    unet = copy.deepcopy(setup.unet)
    inject_lora(unet, unet_lora_config("full", rank=bench.RANK, alpha=bench.ALPHA))
    mark_only_lora_as_trainable(unet)
    unet.train()
    if checkpointing:
        enable_gradient_checkpointing([unet])
    params = [p for p in unet.parameters() if p.requires_grad]
    if adam8bit:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    encoder, cache = copy.deepcopy(setup.text_encoder), None
    if cached:
        cache = TextEmbeddingCache.build(SD, {"text_encoder": encoder}, lambda c: {"input_ids": setup.ids["input_ids"]},
                                         PROMPTS, setup.latents.device, batch_size=len(PROMPTS))
        encoder = None  # the last reference: freed

    def step(account: dict | None = None) -> None:
        """One training step; ``account`` (if given) gets the bytes saved for backward and the grads."""
        if cache is not None:
            states = cache.lookup({**setup.ids, "index": torch.arange(len(PROMPTS))}, setup.latents.device)["encoder_hidden_states"]
        else:
            with torch.no_grad():
                states = encoder(setup.ids["input_ids"], return_dict=False)[0]
        frozen = {t.untyped_storage().data_ptr() for t in unet.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in frozen:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if account is not None else contextlib.nullcontext():
            loss = unet(setup.latents, setup.timesteps, states).sample.float().square().mean()
        loss.backward()
        if account is not None:
            account["saved_mib"] = sum(saved.values()) / 2**20
            account["grads_mib"] = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None) / 2**20
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def held() -> int:
        tensors = list(unet.parameters()) + [t for s in optimizer.state.values() for t in _tensors(s)]
        tensors += list(encoder.parameters()) if encoder is not None else []
        tensors += [t for entry in (cache.table.values() if cache else []) for t in entry.values()]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    return step, held


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _reset_peak(device: torch.device) -> Callable[[], float | None]:
    """Start a peak measurement now; the returned function gives the peak since, in MiB above now."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return lambda: (torch.cuda.synchronize(device), (torch.cuda.max_memory_allocated(device) - before) / 2**20)[1]
    bench._malloc_trim()
    before = bench._rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        return lambda: None
    return lambda: (bench._rss_kib("VmHWM") - before) / 1024


def measure(setup: Setup, flags: tuple[bool, bool, bool], warmup: int, repeats: int, device: torch.device) -> dict:
    gc.collect()
    peak = _reset_peak(device)
    step, held = build_variant(setup, *flags)
    times = []
    for i in range(warmup + repeats):
        bench._sync(device)
        started = time.perf_counter()
        step()
        bench._sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1e3)
    result = {"peak_mib": peak(), "held_mib": held() / 2**20, "ms_median": statistics.median(times),
              "ms_all": [round(t, 1) for t in times]}
    account: dict = {}
    step(account)  # the accounted peak: what is held + saved for backward + the LoRA grads
    result.update(account, accounted_mib=result["held_mib"] + account["saved_mib"] + account["grads_mib"])
    del step, held
    gc.collect()
    return result


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setup = build_setup(args.smoke, device)
    print(setup.description, file=sys.stderr, flush=True)
    rows = {}
    for name, flags in VARIANTS.items():
        rows[name] = measure(setup, flags, args.warmup, args.repeats, device)
        print(f"  {name}: {rows[name]}", file=sys.stderr, flush=True)
    base = rows["baseline"]
    for row in rows.values():
        row["x_baseline_time"] = row["ms_median"] / base["ms_median"]
        row["x_baseline_peak"] = row["peak_mib"] / base["peak_mib"] if row["peak_mib"] and base["peak_mib"] else None
        row["x_baseline_accounted"] = row["accounted_mib"] / base["accounted_mib"]
    return {"device": str(device), "description": setup.description,
            "peak_measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM - VmRSS at build (MiB)",
            "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"{result['description']} ({result['device']}; peak = {result['peak_measure']})", "",
             "| variant | accounted MiB | x baseline | of which saved for backward | peak MiB | x baseline | step ms (median) | x baseline |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        x_peak = "n/a" if r["x_baseline_peak"] is None else f"{r['x_baseline_peak']:.2f}"
        lines.append(f"| {name} | {r['accounted_mib']:.1f} | {r['x_baseline_accounted']:.3f} | {r['saved_mib']:.1f} | {peak} | "
                     f"{x_peak} | {r['ms_median']:.0f} | {r['x_baseline_time']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, one step per variant (CI)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 3; smoke 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1; smoke 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2; smoke 1)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(bench.REPO)}; smoke: none)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 1)
    args.threads = args.threads if args.threads is not None else (1 if args.smoke else 2)
    if args.out is None and not args.smoke:
        args.out = DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    result = run(args)
    report = {
        "command": "python benchmarks/lowmem.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_utc": started,
        "machine": bench.machine(torch.device(result["device"]), args.threads),
        "settings": {"rank": bench.RANK, "repeats": args.repeats, "warmup": args.warmup, "smoke": args.smoke},
        "result": result,
    }
    print(format_table(result), flush=True)
    if args.out is not None:
        bench.write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
