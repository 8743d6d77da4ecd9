"""The low-memory training options of the training script, each checked against the run without it:
gradient checkpointing (LoRA gradients equal and non-zero), 8-bit AdamW (its state checkpointed
without pickle and resumed exactly), and cached text embeddings (same losses and weights, the
encoders never run in the loop and are freed)."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from train_script_helpers import script_args
from transformers import CLIPTextModel

from convlora import adapter_parameters, inject_lora, mark_only_lora_as_trainable, read_safetensors
from convlora.diffusion import text_encoder_lora_config, unet_lora_config
from convlora.diffusion.tiny import load_tiny_tokenizer, tiny_sdxl_unet_config, tiny_text_encoder_config, tiny_unet_config
from convlora.testing import randomize_lora_


@pytest.fixture
def one_thread():
    """One torch thread (as ``accelerate launch`` gives each process): tiny ops on shared cores only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- gradient checkpointing ---------------------------------------------------------------------


def _with_lora(model: torch.nn.Module, config) -> torch.nn.Module:
    """``model`` frozen, LoRA injected (random non-zero A and B, so both get gradients), train mode."""
    model.requires_grad_(False)
    inject_lora(model, config)
    mark_only_lora_as_trainable(model)
    randomize_lora_(model, seed=1, std=0.05)
    return model.train()


def _unet_inputs(unet: UNet2DConditionModel) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    config = unet.config
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, config.cross_attention_dim, generator=g))
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    return args, kwargs


def _lora_grads(model: torch.nn.Module, loss_of) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(0)
    loss_of(model).backward()
    return {name: p.grad.clone() if p.grad is not None else None for name, p in adapter_parameters(model).items()}


def _check_same_nonzero_grads(plain: dict, checkpointed: dict) -> None:
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    missing = [name for name, g in checkpointed.items() if g is None or not bool(g.abs().max() > 0)]
    assert not missing, f"{len(missing)} LoRA tensors got no gradient under checkpointing, e.g. {missing[:3]}"
    assert all(plain[name] is not None and bool(plain[name].abs().max() > 0) for name in plain)
    # the same ops recomputed: equal to float32 rounding of the backward's summation order
    worst = max(float((plain[n] - checkpointed[n]).abs().max() / plain[n].abs().max()) for n in plain)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("unet_config", [tiny_unet_config, tiny_sdxl_unet_config], ids=["sd", "sdxl"])
def test_gradient_checkpointing_gives_the_unet_lora_its_gradients(script, one_thread, unet_config):
    torch.manual_seed(0)
    unet = _with_lora(UNet2DConditionModel(**unet_config()), unet_lora_config("full", rank=4))
    args, kwargs = _unet_inputs(unet)

    def loss(model):
        return model(*args, **kwargs).sample.square().mean()

    plain = _lora_grads(unet, loss)
    script.enable_gradient_checkpointing([unet])
    checkpointed_blocks = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]
    assert len(checkpointed_blocks) >= 4  # the down, mid and up blocks
    _check_same_nonzero_grads(plain, _lora_grads(unet, loss))


def test_gradient_checkpointing_gives_the_text_encoder_lora_its_gradients(script, one_thread):
    tokenizer = load_tiny_tokenizer()
    torch.manual_seed(0)
    encoder = _with_lora(CLIPTextModel(tiny_text_encoder_config(tokenizer)), text_encoder_lora_config("attn-mlp", rank=4))
    ids = tokenizer(["a photo of a sks ball", "a cat"], padding="max_length", return_tensors="pt").input_ids

    def loss(model):
        return model(ids).last_hidden_state.square().mean()

    plain = _lora_grads(encoder, loss)
    script.enable_gradient_checkpointing([encoder])
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in encoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == encoder.config.num_hidden_layers and all(m.gradient_checkpointing for m in layers)
    _check_same_nonzero_grads(plain, _lora_grads(encoder, loss))


# ---- --cache_text_embeddings ----------------------------------------------------------------------


def test_cached_text_embeddings_are_refused_with_a_trained_text_encoder(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--pretrained_model_name_or_path", "base", "--train_data_dir", "data",
                           "--cache_text_encoder_outputs", "--train_text_encoder"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --cache_text_embeddings needs frozen text encoders (their outputs are computed once), but "
        "--train_text_encoder trains them; drop one of the two (see --help)")
    for spelling in ("--cache_text_embeddings", "--cache_text_encoder_outputs", "--pre_compute_text_embeddings"):
        args = script.parse_args(["--pretrained_model_name_or_path", "base", "--train_data_dir", "data", spelling])
        assert args.cache_text_embeddings is True


def _two_captions_each(folder: Path, n: int = 6) -> Path:
    """``n`` 32x32 images with two captions each (one is picked per sample and epoch)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": [f"a photo of a sks ball {i}", f"a sks ball {i}"]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


class ForwardLog:
    """Every forward call of a text encoder or UNet in the process, in order (a global module hook on
    the real modules), and whether any text encoder seen so far was still alive at each training-mode
    UNet call."""

    ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")

    def __init__(self) -> None:
        self.events: list[str] = []
        self.encoders: list[weakref.ref] = []
        self.alive_at_unet_steps: list[int] = []

    def __call__(self, module, args):
        name = type(module).__name__
        inner = any(getattr(ref(), "text_model", None) is module for ref in self.encoders)  # WithProjection's own CLIPTextModel
        if name in self.ENCODERS and not inner:
            self.events.append("encoder")
            if all(ref() is not module for ref in self.encoders):
                self.encoders.append(weakref.ref(module))
        elif isinstance(module, UNet2DConditionModel):
            self.events.append("unet-train" if module.training else "unet-eval")
            if module.training:
                gc.collect()
                self.alive_at_unet_steps.append(sum(ref() is not None for ref in self.encoders))

    def encoder_calls_between_training_steps(self) -> int:
        steps = [i for i, e in enumerate(self.events) if e == "unet-train"]
        return self.events[steps[0] : steps[-1]].count("encoder")


def _train(script, base: Path, data: Path, out: Path, log: ForwardLog | None = None, **options) -> tuple[dict, dict]:
    handle = torch.nn.modules.module.register_module_forward_pre_hook(log) if log is not None else None
    try:
        summary = script.main([str(a) for a in script_args(base, data, out, **options)])
    finally:
        if handle is not None:
            handle.remove()
    return summary, read_safetensors(out / "lora_convlora.safetensors")[0]


RUN = dict(max_train_steps=3, caption_dropout=0.3, lora_dropout=0.1, random_flip=True)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_cached_text_embeddings_train_exactly_as_encoding_every_step(script, one_thread, tiny_base, tiny_sdxl_base,
                                                                     family, tmp_path):
    # caption dropout and two captions per image: 13 distinct captions (12 + the empty one), 7
    # cache batches of 2 per encoder. SD validates (encoders kept on the CPU); SDXL does not (deleted).
    base = tiny_base if family == "sd" else tiny_sdxl_base
    data = _two_captions_each(tmp_path / "data")
    validation = dict(validation_prompt=["a photo of a sks ball 1"], num_validation_images=1, validation_inference_steps=2,
                      validation_guidance_scale=1.0) if family == "sd" else {}
    plain, plain_lora = _train(script, base, data, tmp_path / "plain", **RUN, **validation)
    log = ForwardLog()
    cached, cached_lora = _train(script, base, data, tmp_path / "cached", log=log, cache_text_embeddings=True, **RUN, **validation)

    assert plain["losses"] == cached["losses"] and all(np.isfinite(plain["losses"]))
    assert plain_lora.keys() == cached_lora.keys() and all(torch.equal(plain_lora[k], cached_lora[k]) for k in plain_lora)
    n_encoders = 1 if family == "sd" else 2
    kept = "on the CPU for validation" if validation else "deleted"
    assert cached["text_embedding_cache"]["captions"] == 13 and cached["text_embedding_cache"]["text_encoders"] == kept
    first_step = log.events.index("unet-train")
    assert log.events[:first_step] == ["encoder"] * 7 * n_encoders  # the cache: once per caption
    assert log.events.count("unet-train") == 3 and log.encoder_calls_between_training_steps() == 0
    assert len(log.encoders) == n_encoders
    assert log.alive_at_unet_steps == [n_encoders if validation else 0] * 3  # deleted before the first step
    if validation:
        assert "encoder" in log.events[first_step:]  # the validation pipeline encodes its prompt
        a = np.asarray(Image.open(tmp_path / "plain" / "validation" / "final.png"))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "cached" / "validation" / "final.png")))


def test_text_cache_lookup_is_the_encoders_output_and_an_unknown_caption_is_named(one_thread):
    from convlora.diffusion.families import SD
    from convlora.training.data import DataError
    from convlora.training.text_cache import TextEmbeddingCache

    tokenizer = load_tiny_tokenizer()
    torch.manual_seed(0)
    encoder = CLIPTextModel(tiny_text_encoder_config(tokenizer)).eval()
    tokenize = SD.tokenize({"tokenizer": tokenizer})
    cache = TextEmbeddingCache.build(SD, {"text_encoder": encoder}, tokenize, ["a sks ball", "a cat", ""], torch.device("cpu"),
                                     batch_size=2)
    assert len(cache) == 3 and cache.nbytes == 3 * 77 * 32 * 4
    batch = {**tokenize(["", "a sks ball"]), "index": torch.tensor([4, 7])}
    with torch.no_grad():
        expected = SD.encode_prompts({"text_encoder": encoder}, batch)["encoder_hidden_states"]
    assert torch.equal(cache.lookup(batch, torch.device("cpu"))["encoder_hidden_states"], expected)  # same batch size: exact
    with pytest.raises(DataError, match=r"batch row 1 \(dataset index 7\) has a caption that is not in the text-embedding "
                                        r"cache of 3 captions"):
        cache.lookup({**tokenize(["a cat", "a dog"]), "index": torch.tensor([4, 7])}, torch.device("cpu"))
