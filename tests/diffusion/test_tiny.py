"""The tiny offline SD pipeline, its packaged tokenizer, and the shipped pretrained base."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlora.diffusion.fashion import (
    FASHION_CLASSES,
    caption_for,
    concept_score,
    images_to_tensor,
    load_classifier,
    predict_classes,
)
from convlora.diffusion.tiny import (
    TINY_IMAGE_SIZE,
    build_tiny_pipeline,
    load_tiny_tokenizer,
    save_tiny_pipeline,
)

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "examples" / "tiny-sd-fashion"
SKS_BAG = REPO / "examples" / "sks-bag"


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pipeline(seed=0)


# --- tokenizer ---------------------------------------------------------------------------------

def test_packaged_tokenizer_is_the_1000_token_real_clip_vocabulary():
    tok = load_tiny_tokenizer()
    assert len(tok) == 1000
    assert tok.model_max_length == 77
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", 998)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 999)
    assert tok.pad_token_id == 999
    # First 486 merges of OpenAI's BPE: ids < 998 equal OpenAI's ids ("a</w>" = 320, "of</w>" = 539).
    assert tok("a photo of a cat").input_ids == [998, 320, 816, 531, 539, 320, 66, 536, 999]
    assert tok("a photo of a sks bag").input_ids == [998, 320, 816, 531, 539, 320, 82, 662, 932, 326, 999]
    assert tok.convert_ids_to_tokens([320, 539, 932, 326]) == ["a</w>", "of</w>", "ba", "g</w>"]
    padded = tok("A photo of a BAG", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (1, 77)
    assert padded[0, :9].tolist() == [998, 320, 816, 531, 539, 320, 932, 326, 999]
    assert (padded[0, 9:] == 999).all()


@pytest.mark.skipif(
    not os.environ.get("CONVLORA_CLIP_BPE"),
    reason="set CONVLORA_CLIP_BPE to open_clip's bpe_simple_vocab_16e6.txt.gz to check OpenAI's ids",
)
def test_full_vocabulary_matches_openai_ids(tmp_path):
    from convlora.diffusion.build_tokenizer import check_full_tokenizer, write_tokenizer_folder

    bpe = os.environ["CONVLORA_CLIP_BPE"]
    check_full_tokenizer(bpe)  # "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407]
    rebuilt = write_tokenizer_folder(bpe, tmp_path / "tok", num_merges=486)
    assets = Path(load_tiny_tokenizer().name_or_path)
    for name in ("vocab.json", "merges.txt"):
        assert (rebuilt / name).read_bytes() == (assets / name).read_bytes(), name


# --- build / save ------------------------------------------------------------------------------

def test_build_is_deterministic_and_leaves_global_rng_alone(tiny_pipe):
    state = torch.random.get_rng_state()
    again = build_tiny_pipeline(seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = build_tiny_pipeline(seed=1)
    assert not torch.equal(other.unet.conv_in.weight, tiny_pipe.unet.conv_in.weight)


def test_shapes(tiny_pipe):
    pipe = tiny_pipe
    assert pipe.vae_scale_factor == 4
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 1000
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(2, 3, 32, 32)).latent_dist.mean
        assert latents.shape == (2, 4, 8, 8)
        ids = pipe.tokenizer(["a photo of a bag"] * 2, padding="max_length", return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
        assert hidden.shape == (2, 77, 32)
        eps = pipe.unet(latents, torch.tensor([10, 500]), hidden).sample
        assert eps.shape == (2, 4, 8, 8)
        assert pipe.vae.decode(latents).sample.shape == (2, 3, 32, 32)


def test_save_and_from_pretrained_round_trip(tiny_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = save_tiny_pipeline(tmp_path / "tiny", seed=0)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (path / sub).is_dir(), sub
    assert (path / "model_index.json").is_file()
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (path / "text_encoder" / "model.safetensors").is_file()
    assert not list(path.rglob("*.bin"))
    loaded = StableDiffusionPipeline.from_pretrained(str(path))
    assert len(loaded.tokenizer) == 1000
    gen = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    t = torch.tensor([321])
    with torch.no_grad():
        assert torch.equal(tiny_pipe.unet(x, t, hidden).sample, loaded.unet(x, t, hidden).sample)
    assert loaded.tokenizer("a photo of a bag").input_ids == tiny_pipe.tokenizer("a photo of a bag").input_ids


# --- the shipped pretrained base ---------------------------------------------------------------

@pytest.fixture(scope="module")
def base_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(BASE), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_base_has_the_tiny_architecture(base_pipe, tiny_pipe):
    for name in ("unet", "vae", "text_encoder"):
        shipped = {k: v.shape for k, v in getattr(base_pipe, name).state_dict().items()}
        built = {k: v.shape for k, v in getattr(tiny_pipe, name).state_dict().items()}
        assert shipped == built, name
    assert base_pipe.unet.dtype == torch.float32
    # a plain load (no dtype) gives fp32 modules everywhere, not a mix of fp16 and fp32
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(str(BASE))
    assert {plain.unet.dtype, plain.vae.dtype, plain.text_encoder.dtype} == {torch.float32}
    # latents were scaled to about unit std by the pretraining script
    assert base_pipe.vae.config.scaling_factor != 0.18215
    assert base_pipe.scheduler.config.prediction_type == "epsilon"
    # the committed weights are fp16
    from safetensors import safe_open

    with safe_open(str(BASE / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.float16


def test_shipped_base_samples(base_pipe):
    images = base_pipe(
        [caption_for("sneaker"), caption_for("bag")],
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


# --- classifier and the shipped dataset --------------------------------------------------------

def _sks_bag_images() -> list[Image.Image]:
    lines = (SKS_BAG / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    assert len(rows) == 32
    assert {r["text"] for r in rows} == {"a photo of a sks bag"}
    images = [Image.open(SKS_BAG / r["file_name"]) for r in rows]
    assert all(im.mode == "RGB" and im.size == (32, 32) for im in images)
    return images


def test_classifier_recognises_the_shipped_bags():
    classifier = load_classifier(BASE / "classifier")
    images = _sks_bag_images()
    score = concept_score(images, "bag", classifier)
    assert score >= 0.8, predict_classes(images, classifier)  # 29 / 32 with the shipped files
    # the same answer whatever form the images come in
    as_np = np.stack([np.asarray(im) for im in images]).astype(np.float32) / 255.0
    assert concept_score(as_np, "bag", classifier) == score
    assert concept_score(torch.from_numpy(as_np).permute(0, 3, 1, 2), "bag", classifier) == score
    assert concept_score(images, "sneaker", classifier) < 0.1


def test_images_to_tensor_shapes():
    x = images_to_tensor(np.zeros((3, 64, 64, 3), dtype=np.float32))
    assert x.shape == (3, 3, 32, 32)
    assert images_to_tensor(np.zeros((2, 32, 32), dtype=np.uint8)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="unknown Fashion-MNIST class"):
        concept_score(x, "cat", load_classifier(BASE / "classifier"))
    assert len(FASHION_CLASSES) == 10
