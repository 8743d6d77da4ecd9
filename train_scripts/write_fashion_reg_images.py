#!/usr/bin/env python
"""Write the embedded run's regularisation images: real Fashion-MNIST images of the nine classes the
tiny base knows, in kohya ``N_name`` folders (``examples/fashion-reg/1_a photo of a <class>/``).

    apt-get install dataset-fashion-mnist
    python train_scripts/write_fashion_reg_images.py --per_class 32 --seed 0

Images come from the t10k split (as the instance images in ``examples/sks-bag``), chosen per class by
a seeded permutation, padded to 32x32 RGB like the base's training images. With
``--with_prior_preservation --reg_data_dir examples/fashion-reg`` every batch holds as many of them
as instance images, so the LoRA keeps drawing the known classes while it learns the new one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from convlora.diffusion.fashion import FASHION_CLASSES, FASHION_MNIST_DIR, caption_for, class_index, pad_to_32, read_fashion_mnist  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "examples" / "fashion-reg"))
    p.add_argument("--per_class", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout_class", default="bag", help="The class the base never saw (not written).")
    p.add_argument("--data_root", default=str(FASHION_MNIST_DIR))
    args = p.parse_args(argv)
    images, labels = read_fashion_mnist("t10k", args.data_root)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(args.seed)
    for label in range(10):
        if label == class_index(args.holdout_class):
            continue

        folder = out / f"1_{caption_for(FASHION_CLASSES[label])}"
        folder.mkdir(parents=True)
        chosen = sorted(rng.choice(np.flatnonzero(labels == label), size=args.per_class, replace=False).tolist())
        for i, pixels in enumerate(pad_to_32(images[chosen])):
            Image.fromarray(pixels, mode="L").convert("RGB").save(folder / f"{i:04d}.png")
    print(f"wrote {args.per_class} images of each of 9 classes to {out}")


if __name__ == "__main__":
    main()
