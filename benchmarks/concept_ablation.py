"""Which UNet layers should carry the LoRA? attn vs attn-ff vs full at equal trainable parameters, and
full fine-tuning, on the embedded run (teach "a photo of a sks bag", keep the nine known classes).

    .venv/bin/python benchmarks/concept_ablation.py            # 3 presets x seeds 0,1,2 + full fine-tuning (~1 h, 2 quiet cores)
    .venv/bin/python benchmarks/concept_ablation.py --smoke    # 2 steps, 1 image per prompt: about a minute (a slow test)

Each LoRA run is the training script with no model/data arguments (the demo's settings: prior
preservation on the base's own images of the nine classes against the base's predictions, lr, steps,
sampler) and only ``--unet_preset`` /
``--rank`` / ``--seed`` changed; ranks are chosen so the trainable parameter counts match (counted here
from the injected model, and written to the JSON):

    attn r43 = 247,680    attn-ff r20 = 253,440    full r8 = 249,600

Full fine-tuning is the same script's steps (data, prior-preservation batches, train step, sampling)
with the LoRA removed and every UNet weight trained (AdamW, ``--ft_learning_rate``; the class targets
come from a frozen copy of the base); it is the
reference of what the adapters approximate. For each run: the concept score of the new concept,
each known class's score as a fraction of the base's (drift), the lowest of those, and the wall time
(with the load average, since other jobs on shared cores inflate it). Written as JSON to
``--out`` (default ``benchmarks/results/concept_ablation.json``; the smoke run writes only where
``--out`` says).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "train_text_to_image_lora.py"
#: (preset, rank): trainable parameter counts within 2% of each other on the tiny base.
PRESETS = [("attn", 43), ("attn-ff", 20), ("full", 8)]
SMOKE_FLAGS = ["--max_train_steps", "2", "--num_validation_images", "1", "--validation_inference_steps", "1"]


def load_script():
    spec = importlib.util.spec_from_file_location("train_text_to_image_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def trainable_counts(script) -> dict[str, int]:
    """Trainable LoRA parameters of each (preset, rank) on the embedded base, from the injected UNet."""
    from diffusers import UNet2DConditionModel

    from convlora import adapter_parameters, inject_lora
    from convlora.diffusion import unet_lora_config

    counts = {}
    for preset, rank in PRESETS:
        unet = UNet2DConditionModel.from_pretrained(str(script.EMBEDDED_BASE), subfolder="unet")
        inject_lora(unet, unet_lora_config(preset, rank=rank))
        counts[f"{preset} r{rank}"] = sum(p.numel() for p in adapter_parameters(unet).values())
    unet = UNet2DConditionModel.from_pretrained(str(script.EMBEDDED_BASE), subfolder="unet")
    counts["full fine-tuning"] = sum(p.numel() for p in unet.parameters())
    return counts


def drift(scores: dict[str, dict[str, float]], concept: str) -> dict:
    """Concept score, each known class's LoRA score / base score, and the lowest of those."""
    ratios = {c: round(s["lora"] / s["base"], 3) if s["base"] else None for c, s in scores.items() if c != concept}
    known = [r for r in ratios.values() if r is not None]
    return {"concept_score": scores[concept]["lora"], "concept_base": scores[concept]["base"],
            "class_ratio": ratios, "lowest_class_ratio": min(known) if known else None,
            "lowest_class": min((c for c in ratios if ratios[c] is not None), key=lambda c: ratios[c], default=None),
            "scores": scores}


def lora_run(preset: str, rank: int, seed: int, out: Path, extra: list[str]) -> dict:
    """One training-script run (its own process, as `make demo` runs it); its summary's scores and time."""
    argv = [sys.executable, str(SCRIPT), "--output_dir", str(out), "--unet_preset", preset, "--rank", str(rank),
            "--seed", str(seed), "--report_to", "none", "--save_format", "native", *extra]
    started = time.time()
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{preset} r{rank} seed {seed} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "train_summary.json").read_text())
    return {"seconds": round(time.time() - started, 1), "train_seconds": summary["seconds"], **drift(summary["concept_scores"], "bag")}


def full_finetune_run(seed: int, out: Path, lr: float, extra: list[str], base_scores: dict | None) -> dict:
    """The script's steps with every UNet weight trained instead of a LoRA (same data, batches, loss,
    schedule, sampler); the base scores come from a LoRA run of the same seed (same base images)."""
    import torch

    from convlora import unload

    started = time.time()
    script = load_script()  # a fresh copy: its optimizer is pointed at every UNet weight below
    args = script.parse_args(["--output_dir", str(out), "--seed", str(seed), "--report_to", "none",
                              "--learning_rate", str(lr), *extra])
    accelerator, _ = script.setup(args)
    parallel = script.check_parallelism(accelerator, validating=False)
    script.prepare_class_images(args, accelerator)
    models = script.load_models(args, accelerator)
    unload(models.unet)
    # --prior_target base: the class targets come from a frozen copy of the base (there is no LoRA to switch off)
    frozen = copy.deepcopy(models.unet).requires_grad_(False)
    script.frozen_base_prediction = lambda accelerator, run, latents, timesteps, conditions, part: frozen(
        latents[part], timesteps[part], **script.batch_part(conditions, part), return_dict=False)[0]
    models.unet.requires_grad_(True)
    # every UNet weight is a trained parameter: the script's optimizer, schedule and step take them all
    script.adapter_parameters = lambda model, bias=None: dict(model.named_parameters())
    dataset, dataloader = script.build_data(args, accelerator, models)
    run = script.prepare_training(args, accelerator, models, dataset, dataloader, parallel)
    script.resume_or_start(args, accelerator, models, run, None)
    script.train_loop(args, accelerator, models, run)
    models.unet.eval()
    with torch.no_grad():
        rows = script.sample_images(script.validation_pipeline(args, accelerator, models, run), args)
    lora_scores = script.concept_scores(args, rows)
    scores = {c: {"prompt": p, "base": (base_scores or {}).get(c, {}).get("base", float("nan")), "lora": s}
              for c, (p, s) in lora_scores.items()}
    return {"seconds": round(time.time() - started, 1), "learning_rate": lr, **drift(scores, "bag")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--presets", nargs="+", default=[f"{p}:{r}" for p, r in PRESETS], help="preset:rank pairs")
    p.add_argument("--ft_learning_rate", type=float, default=1e-4, help="Learning rate of the full fine-tuning reference.")
    p.add_argument("--no_full_finetune", action="store_true", help="Skip the full fine-tuning reference.")
    p.add_argument("--smoke", action="store_true", help="2 steps, 1 image per prompt, seed 0: checks that it all runs.")
    p.add_argument("--out", type=str, default=None)
    args = p.parse_args(argv)
    extra = SMOKE_FLAGS if args.smoke else []
    seeds = [0] if args.smoke else args.seeds
    out_path = Path(args.out) if args.out else (None if args.smoke else REPO / "benchmarks" / "results" / "concept_ablation.json")
    script = load_script()
    report = {"settings": {"smoke": args.smoke, "seeds": seeds, "extra_flags": extra, "ft_learning_rate": args.ft_learning_rate,
                           "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "load_before": os.getloadavg()},
              "trainable_parameters": trainable_counts(script), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            base = None
            for spec in args.presets:
                preset, rank = spec.split(":")
                result = lora_run(preset, int(rank), seed, Path(tmp, f"{preset}-{seed}"), extra)
                base = result["scores"]
                report["runs"].append({"variant": f"{preset} r{rank}", "seed": seed, **result})
                print(f"{preset} r{rank} seed {seed}: bag {result['concept_score']:.2f}, lowest class "
                      f"{result['lowest_class']} {result['lowest_class_ratio']}x, {result['seconds']} s", flush=True)
            if not args.no_full_finetune:
                result = full_finetune_run(seed, Path(tmp, f"ft-{seed}"), args.ft_learning_rate, extra, base)
                report["runs"].append({"variant": "full fine-tuning", "seed": seed, **result})
                print(f"full fine-tuning seed {seed}: bag {result['concept_score']:.2f}, lowest class "
                      f"{result['lowest_class']} {result['lowest_class_ratio']}x, {result['seconds']} s", flush=True)
    report["settings"]["load_after"] = os.getloadavg()
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    return report


if __name__ == "__main__":
    main()
