#!/usr/bin/env python
"""Write the embedded run's class images: the frozen tiny base's own samples of the nine classes it
knows, made by the training script's prior-preservation step (``examples/fashion-prior``).

    python train_scripts/write_fashion_prior_images.py            # 32 per class, class seed 0

It runs exactly what ``--with_prior_preservation --class_data_dir examples/fashion-prior`` runs
before training (the embedded settings: 32x32, DDPM 50 steps, guidance 4, ``--class_seed`` 0, 32
images per pipeline call), so the folder is a class-image cache the script accepts as it is:
``class_images.json`` records those settings, and a run with other settings refuses it by name
instead of reusing it. Shipping it saves the demo the minute it takes to make them on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_training_script():
    path = REPO / "train_scripts" / "train_text_to_image_lora.py"
    spec = importlib.util.spec_from_file_location("train_text_to_image_lora", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="Default: the embedded run's examples/fashion-prior.")
    p.add_argument("--per_class", type=int, default=32)
    args = p.parse_args(argv)
    script = load_training_script()
    out = Path(args.out) if args.out else script.EMBEDDED_PRIOR
    run_args = script.parse_args(["--class_data_dir", str(out), "--num_class_images", str(args.per_class)])
    script.prepare_embedded_default(run_args, is_main=True)
    from accelerate import Accelerator

    script.prepare_class_images(run_args, Accelerator(cpu=True))
    print(f"{out}: {args.per_class} images of each of {len(run_args.class_prompt)} class prompts")


if __name__ == "__main__":
    main()
