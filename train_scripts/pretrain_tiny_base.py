#!/usr/bin/env python
"""Pretrain the project's embedded tiny Stable-Diffusion-architecture base on Fashion-MNIST (CPU).

What it makes (all deterministic from ``--seed``):

1. ``<output_dir>/`` — a ``StableDiffusionPipeline`` folder (``unet/``, ``vae/``, ``text_encoder/``,
   ``tokenizer/``, ``scheduler/``, ``model_index.json``), fp16 safetensors, 32x32 images:
   * ``AutoencoderKL`` (~0.95M params, 32x32x3 -> 4x8x8 latents) trained as an autoencoder
     (L1 + small KL) on the images of every class except the held-out one;
     ``vae.config.scaling_factor`` is set so that scaled latents have unit std;
   * ``UNet2DConditionModel`` (~1.43M params) trained with epsilon prediction on the DDPM
     noise schedule (min-SNR-5 weighting, EMA weights saved), conditioned on
     ``"a photo of a <class>"`` through the frozen, randomly initialised 32-wide
     ``CLIPTextModel`` and the real-CLIP-vocabulary 1,000-token tokenizer; 10 % of captions are
     dropped to ``""`` so the empty prompt works as the unconditional for guidance;
   * the held-out class (default ``bag``) is never seen by the VAE or the UNet.
2. ``<output_dir>/classifier/`` — a small CNN trained on all 10 classes (for concept scores).
3. ``<dataset_dir>/`` — 32 held-out-class images from the t10k split (32x32 RGB PNG) with
   ``metadata.jsonl`` captions ``"a photo of a sks bag"`` (diffusers imagefolder layout).
4. ``<output_dir>/samples.png`` — a sanity-check grid (one row per class) and the concept scores.

Needs the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
Run from the repository root::

    python train_scripts/pretrain_tiny_base.py --seed 0

The architecture comes from :mod:`convlora.diffusion.tiny` (``build_tiny_pipeline(seed)``), so a
pipeline built by the tests has exactly the shipped base's shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from convlora.diffusion.fashion import (  # noqa: E402
    FASHION_CLASSES,
    FASHION_MNIST_DIR,
    FashionClassifier,
    caption_for,
    class_index,
    concept_score,
    pad_to_32,
    predict_classes,
    read_fashion_mnist,
    save_classifier,
)
from convlora.diffusion.tiny import build_tiny_pipeline, copy_tokenizer_vocab_files  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain the tiny SD base on Fashion-MNIST (CPU).")
    p.add_argument("--output_dir", default=str(REPO / "examples" / "tiny-sd-fashion"))
    p.add_argument("--dataset_dir", default=str(REPO / "examples" / "sks-bag"))
    p.add_argument("--data_root", default=str(FASHION_MNIST_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout_class", default="bag")
    p.add_argument("--instance_prompt", default="a photo of a sks bag")
    p.add_argument("--num_instance_images", type=int, default=32)
    # One thread: on the 2 shared cores of the project's machines, two torch threads are ~1.7x faster
    # when the machine is idle but 3-4x *slower* when other processes compete for the cores.
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--clf_epochs", type=int, default=2)
    p.add_argument("--clf_batch_size", type=int, default=128)
    p.add_argument("--vae_steps", type=int, default=300)
    p.add_argument("--vae_batch_size", type=int, default=64)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--vae_kl_weight", type=float, default=1e-6)
    p.add_argument("--unet_steps", type=int, default=1200)
    p.add_argument("--unet_batch_size", type=int, default=128)
    p.add_argument("--unet_lr", type=float, default=1e-3)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--snr_gamma", type=float, default=5.0)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--sample_per_class", type=int, default=8)
    p.add_argument("--sample_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    return p.parse_args(argv)


def to_model_range(images_u8: np.ndarray) -> torch.Tensor:
    """(N, 32, 32) uint8 -> (N, 3, 32, 32) float in [-1, 1] (grey copied to RGB)."""
    x = torch.tensor(images_u8, dtype=torch.float32).div_(127.5).sub_(1.0)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    """Linear warmup, then cosine decay to 10 % of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_classifier(args, train_x, train_y, test_x, test_y) -> tuple[FashionClassifier, float, float]:
    """Small CNN on all 10 classes; random +-2 px shifts. Images (N, 28, 28) uint8."""
    torch.manual_seed(args.seed + 100)
    gen = torch.Generator().manual_seed(args.seed + 101)
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x_all = torch.tensor(train_x, dtype=torch.float32).div_(255.0)  # (N, 28, 28)
    y_all = torch.from_numpy(train_y)
    n = len(x_all)
    steps_per_epoch = n // args.clf_batch_size
    total = steps_per_epoch * args.clf_epochs
    step = 0
    loss_avg = 0.0
    model.train()
    for epoch in range(args.clf_epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * args.clf_batch_size : (i + 1) * args.clf_batch_size]
            xb = x_all[idx]
            # place the 28x28 image at a random offset inside the 32x32 canvas (centre = 2)
            canvas = torch.zeros(len(idx), 1, 32, 32)
            ox, oy = torch.randint(0, 5, (2,), generator=gen).tolist()
            canvas[:, 0, oy : oy + 28, ox : ox + 28] = xb
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, 2e-3, warmup=20)
            loss = F.cross_entropy(model(canvas), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_avg = 0.98 * loss_avg + 0.02 * loss.item() if step else loss.item()
            step += 1
        log(f"[classifier] epoch {epoch + 1}/{args.clf_epochs} loss {loss_avg:.4f}")
    model.eval()
    test = torch.from_numpy(pad_to_32(test_x)).float().div_(255.0).unsqueeze(1)
    with torch.no_grad():
        pred = torch.cat([model(test[i : i + 1000]).argmax(1) for i in range(0, len(test), 1000)])
    acc = (pred == torch.from_numpy(test_y)).float().mean().item()
    log(f"[classifier] test accuracy {acc:.4f}")
    return model, loss_avg, acc


def train_vae(args, vae, images_u8: np.ndarray) -> tuple[float, float]:
    """Autoencoder training: L1 reconstruction + ``vae_kl_weight`` * KL (per-sample sums / pixels)."""
    torch.manual_seed(args.seed + 200)
    gen = torch.Generator().manual_seed(args.seed + 201)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    n = len(images_u8)
    perm = torch.randperm(n, generator=gen)
    pos = 0
    rec_avg = kl_avg = 0.0
    for step in range(args.vae_steps):
        if pos + args.vae_batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + args.vae_batch_size].numpy()
        pos += args.vae_batch_size
        x = to_model_range(images_u8[idx])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = (rec - x).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        loss = rec_loss + args.vae_kl_weight * kl * x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec_avg = 0.95 * rec_avg + 0.05 * rec_loss.item() if step else rec_loss.item()
        kl_avg = 0.95 * kl_avg + 0.05 * kl.item() if step else kl.item()
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(f"[vae] step {step + 1}/{args.vae_steps} L1 {rec_avg:.4f} KL/px {kl_avg:.4f}")
    vae.eval()
    return rec_avg, kl_avg


@torch.no_grad()
def encode_all(vae, images_u8: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: two (N, 4, 8, 8) tensors."""
    means, stds = [], []
    for i in range(0, len(images_u8), batch):
        dist = vae.encode(to_model_range(images_u8[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def caption_embeddings(pipe) -> torch.Tensor:
    """(11, 77, 32): the frozen text encoder's output for the 10 class captions, then for ""."""
    prompts = [caption_for(c) for c in FASHION_CLASSES] + [""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def train_unet(args, pipe, mean: torch.Tensor, std: torch.Tensor, labels: np.ndarray, scale: float):
    """Epsilon-prediction DDPM training on cached latent distributions; returns the EMA UNet state
    and the final (unweighted) noise-prediction MSE."""
    torch.manual_seed(args.seed + 300)
    gen = torch.Generator().manual_seed(args.seed + 301)
    unet, sched = pipe.unet, pipe.scheduler
    unet.train()
    emb = caption_embeddings(pipe)
    empty = len(FASHION_CLASSES)
    labels_t = torch.from_numpy(labels)
    alphas_cumprod = sched.alphas_cumprod.float()
    snr_all = alphas_cumprod / (1 - alphas_cumprod)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    n = len(mean)
    perm, pos = torch.randperm(n, generator=gen), 0
    mse_avg = 0.0
    t_start = time.time()
    for step in range(args.unet_steps):
        if pos + args.unet_batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + args.unet_batch_size]
        pos += args.unet_batch_size
        bsz = len(idx)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (bsz,), generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        cond = labels_t[idx].clone()
        cond[torch.rand(bsz, generator=gen) < args.caption_dropout] = empty
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=100)
        pred = unet(noisy, t, emb[cond]).sample
        mse = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        snr = snr_all[t]
        weight = torch.clamp(snr, max=args.snr_gamma) / snr if args.snr_gamma > 0 else torch.ones_like(snr)
        loss = (mse * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        mse_avg = 0.98 * mse_avg + 0.02 * mse.mean().item() if step else mse.mean().item()
        if step % 100 == 0 or step == args.unet_steps - 1:
            rate = (step + 1) / (time.time() - t_start)
            log(f"[unet] step {step + 1}/{args.unet_steps} mse {mse_avg:.4f} ({rate:.2f} it/s)")
    unet.eval()
    return ema, mse_avg


def write_instance_dataset(args, test_x: np.ndarray, test_y: np.ndarray) -> list[int]:
    """32 held-out-class t10k images, chosen by a seeded permutation; returns their t10k indices."""
    out = Path(args.dataset_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    holdout = class_index(args.holdout_class)
    candidates = np.flatnonzero(test_y == holdout)
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(candidates, size=args.num_instance_images, replace=False).tolist())
    padded = pad_to_32(test_x[chosen])
    lines = []
    for i, img in enumerate(padded):
        name = f"{i:04d}.png"
        Image.fromarray(img, mode="L").convert("RGB").save(out / name)
        lines.append(json.dumps({"file_name": name, "text": args.instance_prompt}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    log(f"[dataset] wrote {len(chosen)} '{args.holdout_class}' images to {out}")
    return chosen


@torch.no_grad()
def sample_check(args, pipe, classifier) -> tuple[dict[str, float], Image.Image]:
    """Sample ``sample_per_class`` images per class (fixed seeds), score each with the classifier,
    and make a grid (one row per class)."""
    rows, scores = [], {}
    for ci, name in enumerate(FASHION_CLASSES):
        gen = torch.Generator().manual_seed(args.seed * 1000 + ci)
        images = pipe(
            [caption_for(name)] * args.sample_per_class,
            negative_prompt=[""] * args.sample_per_class,
            num_inference_steps=args.sample_steps,
            guidance_scale=args.guidance_scale,
            generator=gen,
            output_type="np",
        ).images  # (N, 32, 32, 3) in [0, 1]
        scores[name] = concept_score(images, name, classifier)
        preds = predict_classes(images, classifier)
        log(f"[samples] {caption_for(name)!r}: concept score {scores[name]:.2f}  predicted {preds}")
        rows.append(np.concatenate(list(images), axis=1))
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    return scores, Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_readme(out: Path, s: dict) -> None:
    """``<output_dir>/README.md``: how this base was made, from the run's summary."""
    vae, unet, clf, chk = s["vae"], s["unet"], s["classifier"], s["sample_check"]
    wall, cpu = s["wall_seconds"], s["cpu_seconds"]
    score_rows = "\n".join(
        f"| `{caption_for(k)}` | {v:.2f}{' (held out)' if k == s['holdout_class'] else ''} |"
        for k, v in chk["concept_scores"].items()
    )
    scores = chk["concept_scores"]
    known_mean = sum(v for k, v in scores.items() if k != s["holdout_class"]) / max(1, len(scores) - 1)
    held = scores.get(s["holdout_class"], 0.0)
    holdout_note = (
        f"The held-out `{s['holdout_class']}` is recognised in only {held:.0%} of its samples: the base does not "
        "know it; that is what a LoRA trained on `examples/sks-bag/` teaches."
        if held < 0.5 else
        f"Warning: the held-out `{s['holdout_class']}` is already recognised in {held:.0%} of its samples."
    )
    data_rows = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in s["data_sha256"].items())
    text = f"""# tiny-sd-fashion: the embedded tiny Stable-Diffusion base

A Stable-Diffusion-1.x-architecture pipeline (`StableDiffusionPipeline`: `AutoencoderKL`,
`UNet2DConditionModel`, `CLIPTextModel`, real-CLIP-vocabulary `CLIPTokenizer`, `DDPMScheduler`)
that this project pretrained itself on Fashion-MNIST at 32x32, because nothing pretrained can be
downloaded on its machines. Prompted with `"a photo of a <class>"` for one of the 9 classes it was
trained on, it draws that class (mean concept score {known_mean:.2f}, see below);
**`{s['holdout_class']}` was held out** of all base training (VAE and UNet), so a LoRA
has something new to learn: `examples/sks-bag/` holds {s['num_instance_images']} held-out `{s['holdout_class']}` images captioned
`"a photo of a sks bag"`.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("examples/tiny-sd-fashion")  # fp32 modules
images = pipe("a photo of a sneaker", negative_prompt="", guidance_scale=4.0,
              num_inference_steps=50, output_type="np").images          # (1, 32, 32, 3)
```

| part | architecture | params | stored |
|---|---|---|---|
| `vae/` | AutoencoderKL (32, 64, 64), 1 layer/block, 32x32x3 <-> 4x8x8 | {s['params']['vae']:,} | fp16 |
| `unet/` | UNet2DConditionModel (32, 64), 2 layers/block, cross-attention dim 32 | {s['params']['unet']:,} | fp16 |
| `text_encoder/` | CLIPTextModel, hidden 32, 5 layers, vocab 1,000; frozen random init (`initializer_factor` 10) | {s['params']['text_encoder']:,} | fp32 |
| `tokenizer/` | CLIPTokenizer, first 486 merges of OpenAI's BPE (1,000 tokens), max length 77 | - | - |
| `scheduler/` | DDPMScheduler, SD-1.x `scaled_linear` betas 0.00085..0.012, 1,000 steps, epsilon | - | - |
| `classifier/` | `convlora.diffusion.fashion.FashionClassifier` (CNN, all 10 classes) | {s['params']['classifier']:,} | fp32 |

The architecture is exactly `convlora.diffusion.tiny.build_tiny_pipeline(seed)`; the text encoder
is that function's (seed {s['seed']}), untrained. `vae.config.scaling_factor` = **{vae['scaling_factor']}**
(= 1 / std of the posterior-sampled latents of the training images, {vae['latent_std']}), so scaled latents
have unit std.

## How it was made

```bash
apt-get install dataset-fashion-mnist   # /usr/share/datasets/fashion-mnist/*.gz
{s['command'].strip()}
```

Deterministic given the seed ({s['seed']}) on the same library versions and torch thread count
({s['torch_threads']}): {', '.join(f'{k} {v}' for k, v in s['versions'].items())}.

- **Data**: Fashion-MNIST train split, 28x28 grey padded with 2 black pixels per side to 32x32, copied
  to RGB, scaled to [-1, 1]; caption `"a photo of a <class>"` with the class names
  {', '.join(FASHION_CLASSES)}. Base (VAE, UNet) training used the {s['base_train_images']:,} train images that
  are not `{s['holdout_class']}`. No augmentation.
- **Classifier**: {clf['epochs']} epoch(s), batch {clf['batch_size']}, AdamW 2e-3 cosine, random +-2 px shifts, all 10 classes
  of the train split. Final train loss {clf['final_train_loss']}; **test accuracy {clf['test_accuracy']:.4f}** (t10k, 10,000 images).
- **VAE**: {vae['steps']} steps, batch {vae['batch_size']}, AdamW {vae['lr']} (warmup, cosine to 10 %), loss L1 + {vae['kl_weight']} x KL.
  Final L1 (images in [-1, 1]) **{vae['final_l1']}**, KL per pixel {vae['final_kl_per_pixel']}.
- **UNet**: {unet['steps']} steps, batch {unet['batch_size']}, AdamW {unet['lr']} (100 warmup steps, cosine to 10 %), weight decay 0.01,
  grad clip 1.0; epsilon prediction, uniform timesteps, min-SNR-{unet['snr_gamma']:g} loss weighting, latents sampled
  from cached VAE posteriors, {unet['caption_dropout']:.0%} of captions replaced by `""` (the unconditional for guidance);
  EMA of the weights (decay {unet['ema_decay']}, with warmup) is what is saved. Final noise-prediction MSE
  (unweighted, running mean) **{unet['final_mse']}**.
- **Time** on the project's shared 2-core machine: {wall['total'] / 60:.1f} min wall, {cpu['total'] / 60:.1f} min CPU
  (classifier {wall['classifier']:.0f} s, VAE + latent caching {wall['vae']:.0f} s, UNet {wall['unet']:.0f} s, save + check {wall['save_and_check']:.0f} s wall).

Input data files (sha256):

| file | sha256 |
|---|---|
{data_rows}

## Sanity check: concept scores

{chk['per_class']} samples per prompt from the saved files (loaded as fp32), {chk['scheduler']} with {chk['steps']} steps, guidance
{chk['guidance_scale']} against the empty prompt, fixed seeds; the concept score is the share of samples the
classifier recognises as the prompted class. `samples.png` shows them, one row per class in label order.

| prompt | concept score |
|---|---|
{score_rows}

{holdout_note}

```python
from convlora.diffusion.fashion import load_classifier, concept_score
score = concept_score(images, "sneaker", load_classifier("examples/tiny-sd-fashion/classifier"))
```

![samples](samples.png)

This README and `pretrain_summary.json` are written by the pretraining script.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    t0, c0 = time.time(), time.process_time()
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    out = Path(args.output_dir)
    holdout = class_index(args.holdout_class)

    train_x, train_y = read_fashion_mnist("train", args.data_root)
    test_x, test_y = read_fashion_mnist("t10k", args.data_root)
    keep = train_y != holdout
    base_x, base_y = pad_to_32(train_x[keep]), train_y[keep]
    log(f"[data] {len(train_x)} train / {len(test_x)} test images; base training on {len(base_x)} "
        f"(class '{args.holdout_class}' held out)")

    instance_indices = write_instance_dataset(args, test_x, test_y)

    t, c = time.time(), time.process_time()
    classifier, clf_loss, clf_acc = train_classifier(args, train_x, train_y, test_x, test_y)
    times["classifier"], cpu["classifier"] = time.time() - t, time.process_time() - c

    pipe = build_tiny_pipeline(args.seed)
    pipe.text_encoder.requires_grad_(False)

    t, c = time.time(), time.process_time()
    vae_l1, vae_kl = train_vae(args, pipe.vae, base_x)
    pipe.vae.requires_grad_(False)
    mean, std = encode_all(pipe.vae, base_x)
    gen = torch.Generator().manual_seed(args.seed + 250)
    sampled = mean[:4096] + std[:4096] * torch.randn(mean[:4096].shape, generator=gen)
    latent_std = sampled.std().item()
    scaling_factor = float(f"{1.0 / latent_std:.4g}")
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    times["vae"], cpu["vae"] = time.time() - t, time.process_time() - c
    log(f"[vae] latent std {sampled.std().item():.4f} -> scaling_factor {scaling_factor}")

    t, c = time.time(), time.process_time()
    ema, unet_mse = train_unet(args, pipe, mean, std, base_y, scaling_factor)
    pipe.unet.load_state_dict(ema)
    times["unet"], cpu["unet"] = time.time() - t, time.process_time() - c

    # save: fp16 safetensors in the standard diffusers layout
    t, c = time.time(), time.process_time()
    if out.exists():
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "classifier"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    # UNet and VAE in fp16 (diffusers loads them as fp32 unless told otherwise). The text encoder
    # (68k params) stays fp32: transformers 5 loads a model in the dtype its config records, so an
    # fp16 text encoder would make a plain `from_pretrained(path)` mix fp16 and fp32 modules.
    pipe.unet.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    copy_tokenizer_vocab_files(out / "tokenizer")  # for transformers 4.x (slow CLIPTokenizer)
    save_classifier(classifier, out / "classifier", extra={
        "input": "(N, 1 or 3, 32, 32) float in [0, 1]; Fashion-MNIST 28x28 padded by 2 px",
        "test_accuracy": round(clf_acc, 4),
    })

    # reload exactly what was committed (fp16 weights, run in fp32) and check it draws classes
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(str(out))  # what a user gets with no dtype
    dtypes = {plain.unet.dtype, plain.vae.dtype, plain.text_encoder.dtype}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"from_pretrained({out}) gave dtypes {dtypes}, expected float32")
    check = StableDiffusionPipeline.from_pretrained(str(out), dtype=torch.float32)
    check.set_progress_bar_config(disable=True)
    scores, grid = sample_check(args, check, classifier)
    grid.save(out / "samples.png")
    times["save_and_check"], cpu["save_and_check"] = time.time() - t, time.process_time() - c
    times["total"], cpu["total"] = time.time() - t0, time.process_time() - c0

    summary = {
        "seed": args.seed,
        "command": "python train_scripts/pretrain_tiny_base.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "holdout_class": args.holdout_class,
        "base_train_images": int(len(base_x)),
        "num_instance_images": args.num_instance_images,
        "params": {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                   for name in ("unet", "vae", "text_encoder")}
                  | {"classifier": sum(p.numel() for p in classifier.parameters())},
        "data_sha256": {f.name: file_sha256(f) for f in sorted(Path(args.data_root).glob("*-ubyte.gz"))},
        "instance_t10k_indices": instance_indices,
        "classifier": {"epochs": args.clf_epochs, "batch_size": args.clf_batch_size,
                       "final_train_loss": round(clf_loss, 4), "test_accuracy": round(clf_acc, 4)},
        "vae": {"steps": args.vae_steps, "batch_size": args.vae_batch_size, "lr": args.vae_lr,
                "kl_weight": args.vae_kl_weight, "final_l1": round(vae_l1, 4),
                "final_kl_per_pixel": round(vae_kl, 4), "latent_std": round(latent_std, 4),
                "scaling_factor": scaling_factor},
        "unet": {"steps": args.unet_steps, "batch_size": args.unet_batch_size, "lr": args.unet_lr,
                 "caption_dropout": args.caption_dropout, "snr_gamma": args.snr_gamma,
                 "ema_decay": args.ema_decay, "final_mse": round(unet_mse, 4)},
        "sample_check": {"per_class": args.sample_per_class, "scheduler": type(check.scheduler).__name__,
                         "steps": args.sample_steps, "guidance_scale": args.guidance_scale,
                         "concept_scores": {k: round(v, 3) for k, v in scores.items()}},
        "wall_seconds": {k: round(v, 1) for k, v in times.items()},
        "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
        "torch_threads": args.num_threads,
        "versions": {"torch": torch.__version__,
                     "diffusers": __import__("diffusers").__version__,
                     "transformers": __import__("transformers").__version__},
    }
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_readme(out, summary)
    log(json.dumps(summary, indent=2))
    log(f"done in {times['total'] / 60:.1f} min")


if __name__ == "__main__":
    main()
