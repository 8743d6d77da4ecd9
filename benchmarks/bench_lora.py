"""convlora vs PEFT vs the frozen floor: training-step time, inference time and memory, in one process.

    .venv/bin/python benchmarks/bench_lora.py            # the README table (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_lora.py --smoke    # tiny sizes, one repeat: seconds (CI)

What is measured, per model (every variant of a model is built first, then all are run interleaved,
round-robin in a rotating order, for ``--repeats`` rounds after ``--warmup`` untimed steps each):

* **training step** = forward + backward of ``mean(out**2)`` (no optimizer step; grads are reset
  outside the timed region). The input requires grad, so backward runs through every layer.
    - ``floor``: every weight frozen — the cost of the frozen network itself.
    - ``convlora <preset>`` / ``peft <preset>``: LoRA r=8, alpha=8 on the same modules (checked:
      identical sets of adapted module paths), only the adapter trains, same random A and B.
    - ``full fine-tuning``: every weight trains.
* **inference** (``torch.no_grad``): ``base``; ``convlora merged`` (``eval()`` merges ΔW);
  ``convlora unmerged`` (``merge_on_eval=False``); ``peft unmerged``.
* **memory** of each training variant, from one extra (untimed) step:
    - CUDA: ``torch.cuda.max_memory_allocated`` during the step, minus what was allocated before.
    - CPU: ``saved`` = bytes of the distinct tensor storages autograd keeps for backward (through
      ``torch.autograd.graph.saved_tensors_hooks``, parameters and buffers excluded) plus the
      gradients the step creates — the memory a variant adds on top of its weights, exactly;
      ``peak RSS`` = the process's peak resident set during the step (``VmHWM`` after resetting it
      via ``/proc/self/clear_refs``, after ``malloc_trim``) minus the resident set before it — what
      the OS saw, including temporaries and allocator slack (noisier; Linux only).

Times are wall-clock medians (and minimum) over the repeats (inference: three samples per round);
ratios are medians of per-round ratios (a variant against the reference measured seconds apart, which
cancels most of the drift in other jobs' load); the CPU time of the process
(``time.process_time``, both threads) is recorded too, since other jobs on shared cores inflate
wall time. OpenMP's wait policy is left as the environment sets it (the libgomp default: a waiting
thread spins a while, then sleeps) and recorded, so run it on a quiet machine (why: the comment at
the imports). The load average before and after each model is recorded with the results.

Results are printed as a table and written as JSON (``--out``, default
``benchmarks/results/latest.json``; the smoke run writes only where ``--out`` says).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# OpenMP's wait policy decides what these timings mean, so it is left alone (what users get) and
# recorded. With libgomp's default a thread that waits for its partner spins for a while: on cores
# busy with other jobs that spinning made a 2-thread tiny-UNet step 10-30x slower, so run the
# benchmark on a quiet machine. OMP_WAIT_POLICY=PASSIVE survives contention but is no fair measure:
# every parallel region then pays a futex wake-up (~50 us here, against ~60 us for a whole r=8 GEMM),
# which inflated the SD-UNet floor from 962 to 1253 ms and penalised LoRA's many small ops most.

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

import convlora  # noqa: E402
from convlora.testing import randomize_lora_  # noqa: E402

RANK, ALPHA = 8, 8.0
INFER_SAMPLES_PER_ROUND = 3
DEFAULT_OUT = REPO / "benchmarks" / "results" / "latest.json"


# ---- workloads ------------------------------------------------------------------------------------
@dataclass
class Workload:
    """One model to benchmark: how to build it, its inputs, and its LoRA target presets."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    presets: dict[str, str | list[str]]  # preset name -> target_modules (convlora and PEFT alike)
    infer_preset: str  # the preset used for the inference rows
    call: Callable[[nn.Module, tuple], torch.Tensor] = field(default=lambda m, args: m(*args))


def _unet_call(model: nn.Module, args: tuple) -> torch.Tensor:
    return model(*args).sample


def _unet_workload(name: str, blocks: tuple[int, ...], cross_dim: int, latent: int, text_len: int, smoke: bool) -> Workload:
    from diffusers import UNet2DConditionModel

    from convlora.diffusion import unet_lora_config

    if len(blocks) == 2:  # the tiny test UNet of diffusers' own tests (ENVIRONMENT.md)
        down, up = ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
    else:  # Stable-Diffusion-shaped: cross-attention in all but the lowest-resolution level
        down = ("CrossAttnDownBlock2D",) * (len(blocks) - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(blocks) - 1)

    def build() -> nn.Module:
        return UNet2DConditionModel(
            block_out_channels=blocks, layers_per_block=2, sample_size=latent, in_channels=4, out_channels=4,
            down_block_types=down, up_block_types=up, cross_attention_dim=cross_dim,
        )

    def inputs() -> tuple:
        g = torch.Generator().manual_seed(0)
        return (torch.randn(2, 4, latent, latent, generator=g), torch.tensor([10, 500]),
                torch.randn(2, text_len, cross_dim, generator=g))

    presets = {p: unet_lora_config(p, rank=RANK, alpha=ALPHA).target_modules for p in ("attn", "full")}
    desc = (f"UNet2DConditionModel block_out_channels={blocks}, layers_per_block=2, cross_attention_dim="
            f"{cross_dim}; latents 2x4x{latent}x{latent}, text 2x{text_len}x{cross_dim}")
    return Workload(name, desc, build, inputs, presets, "full", _unet_call)


class _BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def _conv_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)]


def _cnn2d_workload(smoke: bool) -> Workload:
    widths, batch, size = ((8, 16), 2, 16) if smoke else ((64, 128, 256), 8, 64)

    def build() -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        c_in = widths[0]
        for i, w in enumerate(widths):
            layers += [_BasicBlock(c_in, w, 1 if i == 0 else 2), _BasicBlock(w, w, 1)]
            c_in = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)]
        return nn.Sequential(*layers)

    def inputs() -> tuple:
        return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),)

    desc = f"ResNet-style Conv2d stack (basic blocks, widths {widths}, BatchNorm); input {batch}x3x{size}x{size}"
    return Workload("cnn2d", desc, build, inputs, {"convs": _conv_paths(build())}, "convs")


def _cnn1d_workload(smoke: bool) -> Workload:
    width, batch, length = (16, 2, 64) if smoke else (128, 4, 4096)

    def build() -> nn.Module:
        w = width
        return nn.Sequential(
            nn.Conv1d(16, w // 2, 7, padding=3), nn.GELU(),
            nn.Conv1d(w // 2, w // 2, 5, padding=2), nn.GELU(),
            nn.Conv1d(w // 2, w, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(w, w, 3, padding="same"), nn.GELU(),
            nn.Conv1d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv1d(2 * w, 2 * w, 1),
        )

    def inputs() -> tuple:
        return (torch.randn(batch, 16, length, generator=torch.Generator().manual_seed(0)),)

    desc = f"Conv1d stack (7 convs, widths {width // 2}-{2 * width}, strides 2, 'same'); input {batch}x16x{length}"
    return Workload("cnn1d", desc, build, inputs, {"convs": _conv_paths(build())}, "convs")


def _cnn3d_workload(smoke: bool) -> Workload:
    width, batch, frames, size = (8, 1, 4, 8) if smoke else (32, 2, 8, 48)

    def build() -> nn.Module:
        w = width
        return nn.Sequential(
            nn.Conv3d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv3d(w, w, 3, padding=1), nn.SiLU(),
            nn.Conv3d(w, 2 * w, 3, stride=(1, 2, 2), padding=1), nn.SiLU(),
            nn.Conv3d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv3d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv3d(4 * w, 4 * w, (1, 3, 3), padding=(0, 1, 1)),
        )

    def inputs() -> tuple:
        return (torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(0)),)

    desc = f"Conv3d stack (6 convs, widths {width}-{4 * width}, strides (1,2,2) and 2); input {batch}x3x{frames}x{size}x{size}"
    return Workload("cnn3d", desc, build, inputs, {"convs": _conv_paths(build())}, "convs")


def workloads(smoke: bool) -> dict[str, Callable[[], Workload]]:
    """Name -> builder of each workload (the SD-shaped UNet is skipped by --smoke: too big for CI)."""
    tiny_latent = 8 if smoke else 32
    text_len = 4 if smoke else 77
    table = {
        "unet-tiny": lambda: _unet_workload("unet-tiny", (32, 64), 32, tiny_latent, text_len, smoke),
        "unet-sd": lambda: _unet_workload("unet-sd", (128, 256, 512), 256, 32, text_len, smoke),
        "cnn2d": lambda: _cnn2d_workload(smoke),
        "cnn1d": lambda: _cnn1d_workload(smoke),
        "cnn3d": lambda: _cnn3d_workload(smoke),
    }
    if smoke:
        del table["unet-sd"]
    return table


# ---- variants -------------------------------------------------------------------------------------
def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _convlora(base: nn.Module, targets, merge_on_eval: bool = True) -> nn.Module:
    model = copy.deepcopy(base)
    config = convlora.LoRAConfig(r=RANK, alpha=ALPHA, target_modules=targets, merge_on_eval=merge_on_eval)
    convlora.inject_lora(model, config)
    convlora.mark_only_lora_as_trainable(model)
    randomize_lora_(model, seed=0, std=0.02)
    return model


def _peft(base: nn.Module, targets, like: nn.Module) -> nn.Module:
    """PEFT LoRA on the same modules as the convlora model ``like``, with its A and B copied in."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    model = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets), copy.deepcopy(base))
    peft_paths = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    ours = convlora.lora_layers(like)
    if peft_paths != set(ours):
        raise RuntimeError(f"PEFT and convlora adapt different modules: {sorted(peft_paths ^ set(ours))[:5]}")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, layer in ours.items():
            peft_layer = modules[path]
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.view_as(peft_layer.lora_A["default"].weight))
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.view_as(peft_layer.lora_B["default"].weight))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return model


def build_variants(w: Workload, device: torch.device, dtype: torch.dtype):
    """(training variants, inference variants): name -> model, all on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    base = w.build().to(device=device, dtype=dtype)
    train: dict[str, nn.Module] = {"frozen floor": _freeze(copy.deepcopy(base))}
    for preset, targets in w.presets.items():
        ours = _convlora(_freeze(copy.deepcopy(base)), targets)
        train[f"convlora {preset}"] = ours
        train[f"peft {preset}"] = _peft(_freeze(copy.deepcopy(base)), targets, ours)
    train["full fine-tuning"] = copy.deepcopy(base).requires_grad_(True)
    for model in train.values():
        model.train()
    targets = w.presets[w.infer_preset]
    merged = _convlora(_freeze(copy.deepcopy(base)), targets)
    unmerged = _convlora(_freeze(copy.deepcopy(base)), targets, merge_on_eval=False)
    infer = {
        "base": _freeze(copy.deepcopy(base)),
        "convlora merged (eval)": merged,
        "convlora unmerged": unmerged,
        "peft unmerged": _peft(_freeze(copy.deepcopy(base)), targets, merged),
    }
    for model in infer.values():
        model.eval()
    return train, infer, base


# ---- measuring ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(w: Workload, model: nn.Module, args: tuple) -> None:
    x, *rest = args
    x = x.detach().requires_grad_(True)
    out = w.call(model, (x, *rest))
    out.float().square().mean().backward()


def _reset_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _infer_step(w: Workload, model: nn.Module, args: tuple) -> None:
    with torch.no_grad():
        w.call(model, args)


def _timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_memory(w: Workload, model: nn.Module, args: tuple, device: torch.device) -> dict[str, float | None]:
    """Memory of one training step (see the module docstring for the method)."""
    _reset_grads(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _train_step(w, model, args)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        _reset_grads(model)
        return {"peak_allocated_mib": peak / 2**20}
    param_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    _malloc_trim()
    rss_before = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        can_reset = True
    except OSError:
        can_reset = False
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _train_step(w, model, args)
    peak_rss = _rss_kib("VmHWM") if can_reset else None
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    _reset_grads(model)
    result = {"saved_for_backward_mib": sum(saved.values()) / 2**20, "grads_mib": grads / 2**20}
    result["saved_plus_grads_mib"] = result["saved_for_backward_mib"] + result["grads_mib"]
    result["peak_rss_delta_mib"] = (peak_rss - rss_before) / 1024 if peak_rss is not None and rss_before else None
    return result


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    walls = [s[0] * 1e3 for s in samples]
    cpus = [s[1] * 1e3 for s in samples]
    return {"ms_median": statistics.median(walls), "ms_min": min(walls), "cpu_ms_median": statistics.median(cpus),
            "ms_all": [round(v, 2) for v in walls], "cpu_ms_all": [round(v, 2) for v in cpus]}


def run_workload(w: Workload, args, device: torch.device, dtype: torch.dtype) -> dict:
    load_before = _load()
    train, infer, _ = build_variants(w, device, dtype)
    inputs = tuple(t.to(device) if torch.is_tensor(t) else t for t in w.inputs())
    inputs = tuple(t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs)
    _check_parity(w, train, infer, inputs)

    steps: dict[str, Callable[[], None]] = {}
    for name, model in train.items():
        steps["train/" + name] = (lambda m=model: _train_step(w, m, inputs))
    for name, model in infer.items():
        steps["infer/" + name] = (lambda m=model: _infer_step(w, m, inputs))
    resets = {"train/" + n: (lambda m=m: _reset_grads(m)) for n, m in train.items()}

    for _ in range(args.warmup):
        for key, fn in steps.items():
            fn()
            resets.get(key, lambda: None)()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in steps}
    keys = list(steps)
    for round_index in range(args.repeats):
        shift = round_index % len(keys)  # rotate the order so no variant always runs first
        for key in keys[shift:] + keys[:shift]:
            # inference steps are short and their ratios small: three samples per round
            for _ in range(1 if key.startswith("train/") else INFER_SAMPLES_PER_ROUND):
                samples[key].append(_timed(steps[key], device))
                resets.get(key, lambda: None)()

    result = {"description": w.description, "load_before": load_before, "train": {}, "infer": {}}
    for key, s in samples.items():
        kind, name = key.split("/", 1)
        result[kind][name] = _summary(s)
    if not args.no_memory:
        if not args.smoke:  # a full collection takes ~0.3 s with diffusers loaded
            gc.collect()  # once: tensors die by refcount; this clears leftover cycles before the RSS baselines
        for name, model in train.items():
            result["train"][name]["memory"] = measure_memory(w, model, inputs, device)
    result["load_after"] = _load()
    _add_ratios(result)
    del train, infer
    if not args.smoke:
        gc.collect()
    return result


def _check_parity(w: Workload, train: dict, infer: dict, inputs: tuple) -> None:
    """convlora and PEFT (same A, B) give the same outputs, so the comparison is of equal work."""
    with torch.no_grad():
        for preset in w.presets:
            ours = w.call(train[f"convlora {preset}"], inputs).float()
            theirs = w.call(train[f"peft {preset}"], inputs).float()
            err = float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-12))
            if err > 1e-3:
                raise RuntimeError(f"{w.name} {preset}: convlora and PEFT outputs differ (relative {err:.1e})")


def _paired_ratio(row: dict, ref: dict, key: str) -> float:
    """Median over rounds of ``row / ref`` for samples taken in the same round: load from other jobs
    drifts over minutes, and a ratio of two steps run seconds apart cancels most of it."""
    return statistics.median(a / b for a, b in zip(row[key], ref[key]))


def _add_ratios(result: dict) -> None:
    train, infer = result["train"], result["infer"]
    floor = train["frozen floor"]
    for name, row in train.items():
        row["x_floor"] = _paired_ratio(row, floor, "ms_all")
        row["x_floor_cpu"] = _paired_ratio(row, floor, "cpu_ms_all")
        if name.startswith("convlora "):
            peft = train["peft " + name.split(" ", 1)[1]]
            row["x_peft"] = _paired_ratio(row, peft, "ms_all")
            row["x_peft_cpu"] = _paired_ratio(row, peft, "cpu_ms_all")
    for row in infer.values():
        row["x_base"] = _paired_ratio(row, infer["base"], "ms_all")
        row["x_base_cpu"] = _paired_ratio(row, infer["base"], "cpu_ms_all")


def goals(results: dict) -> dict:
    """The issue's targets, evaluated on the SD-shaped UNet (or the largest UNet that ran)."""
    name = "unet-sd" if "unet-sd" in results else next((n for n in results if n.startswith("unet")), None)
    if name is None:
        return {}
    train, infer = results[name]["train"], results[name]["infer"]
    full, attn = train["convlora full"], train["convlora attn"]
    out = {
        "full: convlora <= 1.10x frozen floor": (full["x_floor"], 1.10),
        "full: convlora <= 0.80x PEFT": (full["x_peft"], 0.80),
        "attn: convlora <= 1.00x PEFT": (attn["x_peft"], 1.00),
        "merged inference <= 1.02x base": (infer["convlora merged (eval)"]["x_base"], 1.02),
    }
    report = {k: {"value": round(v, 3), "target": t, "met": v <= t, "model": name} for k, (v, t) in out.items()}
    mem_key = "saved_plus_grads_mib" if "saved_plus_grads_mib" in full.get("memory", {}) else "peak_allocated_mib"
    if "memory" in full:
        for preset in ("attn", "full"):
            ours = train[f"convlora {preset}"]["memory"][mem_key]
            theirs = train[f"peft {preset}"]["memory"][mem_key]
            report[f"{preset}: memory <= PEFT ({mem_key})"] = {
                "value": round(ours, 1), "target": round(theirs, 1), "met": ours <= theirs, "model": name}
    return report


# ---- reporting ------------------------------------------------------------------------------------
def machine(device: torch.device, threads: int) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    import diffusers
    import peft

    info = {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "peft": peft.__version__, "convlora": convlora.__version__, "device": str(device),
        "mkldnn": torch.backends.mkldnn.is_available(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default)"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def format_table(name: str, r: dict) -> str:
    mem_col = any("memory" in row for row in r["train"].values())
    lines = [f"## {name}: {r['description']}", f"load average before {r['load_before']}, after {r['load_after']}", ""]
    header = "| training step (fwd+bwd) | ms (median) | ms (min) | x floor | x PEFT | x floor (CPU time) |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if mem_col:
        header += " saved+grads MiB | peak RSS delta MiB |"
        sep += "---:|---:|"
    lines += [header, sep]
    for variant, row in r["train"].items():
        line = (f"| {variant} | {row['ms_median']:.1f} | {row['ms_min']:.1f} | {row['x_floor']:.2f} | "
                f"{row['x_peft']:.2f} |" if "x_peft" in row else
                f"| {variant} | {row['ms_median']:.1f} | {row['ms_min']:.1f} | {row['x_floor']:.2f} | |")
        line += f" {row['x_floor_cpu']:.2f} |"
        if mem_col:
            mem = row.get("memory", {})
            if "peak_allocated_mib" in mem:
                line += f" {mem['peak_allocated_mib']:.1f} (CUDA peak) | |"
            else:
                rss = mem.get("peak_rss_delta_mib")
                line += f" {mem.get('saved_plus_grads_mib', float('nan')):.1f} | {'' if rss is None else f'{rss:.0f}'} |"
        lines.append(line)
    lines += ["", "| inference (no grad) | ms (median) | ms (min) | x base | x base (CPU time) |", "|---|---:|---:|---:|---:|"]
    for variant, row in r["infer"].items():
        lines.append(f"| {variant} | {row['ms_median']:.1f} | {row['ms_min']:.1f} | {row['x_base']:.3f} | {row['x_base_cpu']:.3f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, 1 repeat, no warm-up (CI: checks that everything builds and runs)")
    parser.add_argument("--models", nargs="+", default=None, help="subset of workloads (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (default 10; smoke 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default 2; smoke 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default 2; smoke 1: tiny ops on shared cores only spin)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement step")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON results path (default {DEFAULT_OUT.relative_to(REPO)}; smoke: none)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 10
    if args.warmup is None:
        args.warmup = 0 if args.smoke else 2
    if args.threads is None:
        args.threads = 1 if args.smoke else 2
    if args.out is None and not args.smoke:
        args.out = DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    table = workloads(args.smoke)
    names = args.models or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {list(table)}")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results = {}
    for name in names:
        w = table[name]()
        print(f"[{name}] {w.description}", file=sys.stderr, flush=True)
        results[name] = run_workload(w, args, device, dtype)
        print(format_table(name, results[name]) + "\n", flush=True)
    report = {
        "command": "python benchmarks/bench_lora.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_utc": started,
        "machine": machine(device, args.threads),
        "settings": {"rank": RANK, "alpha": ALPHA, "repeats": args.repeats, "warmup": args.warmup,
                     "dtype": str(dtype).replace("torch.", ""), "smoke": args.smoke,
                     "step": "forward + backward of mean(out**2), input requires grad, no optimizer step"},
        "results": results,
        "goals": goals(results),
    }
    if report["goals"]:
        print("goals (" + next(iter(report["goals"].values()))["model"] + "):")
        for goal, g in report["goals"].items():
            print(f"  {'met    ' if g['met'] else 'NOT met'}  {goal}: {g['value']} (target {g['target']})")
    if args.out is not None:
        write_report(report, args.out)
    return report


def write_report(report: dict, out: Path) -> None:
    """The JSON report at ``out`` (folders made as needed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
