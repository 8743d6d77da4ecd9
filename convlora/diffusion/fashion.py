"""Fashion-MNIST helpers for the embedded tiny base: class names, captions, the IDX reader,
the 32x32 preprocessing, and a small CNN classifier that gives a "concept score".

The concept score of a batch of generated images for a class is the share of them that the
classifier recognises as that class. The classifier is trained on all 10 Fashion-MNIST classes
by ``train_scripts/pretrain_tiny_base.py`` and shipped beside the embedded base in the
repository (``examples/tiny-sd-fashion/classifier/``: ``model.safetensors`` + ``config.json``);
callers pass that folder to :func:`load_classifier`, since an installed package has no checkout.

Nothing here needs the Debian ``dataset-fashion-mnist`` package at import time; only
:func:`read_fashion_mnist` (used when pretraining) reads its files.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FASHION_CLASSES",
    "FASHION_MNIST_DIR",
    "caption_for",
    "class_index",
    "read_fashion_mnist",
    "pad_to_32",
    "FashionClassifier",
    "save_classifier",
    "load_classifier",
    "images_to_tensor",
    "predict_classes",
    "concept_score",
]

#: Readable Fashion-MNIST class names, in label order (label ``i`` is ``FASHION_CLASSES[i]``).
FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

def caption_for(class_name: str) -> str:
    """``"a photo of a <class>"``, the caption format the tiny base was pretrained with."""
    return f"a photo of a {class_name}"


def class_index(class_name: str) -> int:
    """Label index of a class name (case-insensitive); raises ``ValueError`` naming the choices."""
    name = class_name.strip().lower()
    if name not in FASHION_CLASSES:
        raise ValueError(f"unknown Fashion-MNIST class {class_name!r}; choose from {list(FASHION_CLASSES)}")
    return FASHION_CLASSES.index(name)


def read_fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Read one split of Fashion-MNIST from the gzipped IDX files.

    Args:
        split: ``"train"`` (60,000 images) or ``"t10k"`` / ``"test"`` (10,000 images).
        root: folder holding ``{split}-images-idx3-ubyte.gz`` and ``{split}-labels-idx1-ubyte.gz``
            (``apt-get install dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``).

    Returns:
        ``(images, labels)``: ``uint8`` array of shape ``(N, 28, 28)`` (0 = black background) and
        ``int64`` array of shape ``(N,)`` with values in ``0..9``.
    """
    split = {"test": "t10k"}.get(split, split)
    if split not in ("train", "t10k"):
        raise ValueError(f"split must be 'train' or 't10k', got {split!r}")
    root = Path(root)
    img_path = root / f"{split}-images-idx3-ubyte.gz"
    lbl_path = root / f"{split}-labels-idx1-ubyte.gz"
    if not img_path.exists() or not lbl_path.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {root}; install them with "
            "`apt-get install dataset-fashion-mnist` or pass root="
        )
    with gzip.open(img_path, "rb") as fh:
        images = np.frombuffer(fh.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lbl_path, "rb") as fh:
        labels = np.frombuffer(fh.read(), dtype=np.uint8, offset=8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels in {root} ({split})")
    return images, labels


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """Pad ``(N, 28, 28)`` uint8 images with 2 black pixels per side to ``(N, 32, 32)``."""
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected (N, 28, 28) images, got {images.shape}")
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))


class FashionClassifier(nn.Module):
    """Small CNN for 32x32 Fashion-MNIST images.

    Input: ``(N, C, 32, 32)`` float images in ``[0, 1]`` (``C`` = 1 or 3; RGB is averaged to grey).
    Output: ``(N, num_classes)`` logits.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 64), hidden: int = 128, num_classes: int = 10,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "channels": list(channels),
            "hidden": hidden,
            "num_classes": num_classes,
            "dropout": dropout,
        }
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = 32 // 2 ** len(channels)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c_in * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2:] != (32, 32):
            raise ValueError(f"expected (N, C, 32, 32) images, got {tuple(x.shape)}")
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        # Fixed normalisation (Fashion-MNIST padded to 32x32: mean ~0.25, std ~0.35).
        x = (x - 0.25) / 0.35
        return self.head(self.features(x))


def save_classifier(model: FashionClassifier, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save to ``path/model.safetensors`` + ``path/config.json`` (``extra`` is merged into the json)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"class_names": list(FASHION_CLASSES), **model.config, **(extra or {})}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def load_classifier(path: str | Path) -> FashionClassifier:
    """Load a classifier saved by :func:`save_classifier` from folder ``path``, in eval mode on the CPU."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no classifier at {folder} (expected model.safetensors + config.json)")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = FashionClassifier(
        channels=config["channels"], hidden=config["hidden"], num_classes=config["num_classes"],
        dropout=config.get("dropout", 0.25),
    )
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()


def images_to_tensor(images: Any) -> torch.Tensor:
    """Turn generated images into a ``(N, C, 32, 32)`` float tensor in ``[0, 1]``.

    Accepts a list of PIL images, a numpy array ``(N, H, W, C)`` / ``(N, H, W)`` in ``[0, 1]``
    (diffusers ``output_type="np"``) or ``uint8``, or a torch tensor ``(N, C, H, W)`` in ``[0, 1]``
    (diffusers ``output_type="pt"``). Other sizes are resized (bilinear, antialiased) to 32x32.
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.ndim == 3:
            x = x.unsqueeze(1)
    else:
        if isinstance(images, np.ndarray):
            arr = images
        else:  # sequence of PIL images or arrays
            arr = np.stack([np.asarray(im) for im in images])
        if arr.ndim == 3:
            arr = arr[..., None]
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
        x = x.float() / 255.0 if x.dtype == torch.uint8 or arr.dtype == np.uint8 else x.float()
    if x.ndim != 4:
        raise ValueError(f"cannot interpret images of shape {tuple(x.shape)}")
    if x.shape[-2:] != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0.0, 1.0)


@torch.no_grad()
def predict_classes(images: Any, classifier: FashionClassifier | None = None) -> list[str]:
    """Predicted class name for each image (see :func:`images_to_tensor` for accepted inputs)."""
    model = classifier if classifier is not None else load_classifier()
    was_training = model.training
    model.eval()
    logits = model(images_to_tensor(images))
    model.train(was_training)
    return [FASHION_CLASSES[i] for i in logits.argmax(dim=1).tolist()]


def concept_score(images: Any, class_name: str, classifier: FashionClassifier | None = None) -> float:
    """Share (0..1) of ``images`` that the classifier recognises as ``class_name``.

    Args:
        images: generated images: list of PIL images, numpy ``(N, H, W, C)`` in ``[0, 1]``, or a
            torch tensor ``(N, C, H, W)`` in ``[0, 1]``.
        class_name: one of :data:`FASHION_CLASSES` (e.g. ``"bag"``).
        classifier: a loaded :class:`FashionClassifier`; default: the shipped one.
    """
    target = FASHION_CLASSES[class_index(class_name)]
    preds = predict_classes(images, classifier)
    if not preds:
        raise ValueError("no images given")
    return sum(p == target for p in preds) / len(preds)
