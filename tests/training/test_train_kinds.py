"""End-to-end: the training script with the other adapter kinds (--adapter dora / loha / lokr), through
`accelerate launch` on the tiny pipeline: a LoKr run whose file reloads exactly and whose validation
honours --validation_lora_scale, and an exact mid-run resume of a LoHa + DoRA run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from train_script_helpers import (
    check_ok,
    command_line_error,
    launch,
    load_pipeline,
    script_args,
    summary,
    unet_out,
)

from convlora import load_lora, lora_scale, read_safetensors

pytestmark = pytest.mark.slow

PROMPT = "a photo of a sks ball"


def test_lokr_run_trains_saves_a_kohya_file_that_reloads_exactly_and_validates_at_its_scale(tiny_base, toy_data, tmp_path):
    out = tmp_path / "run"
    check_ok(launch(script_args(
        tiny_base, toy_data, out, adapter="lokr", lokr_factor=2, rank=4, max_train_steps=4, checkpointing_steps=4,
        learning_rate=3e-3, save_format=None, validation_prompt=[PROMPT], num_validation_images=1,
        validation_inference_steps=3, validation_guidance_scale=1.0, validation_lora_scale=0.5,
    )))
    s = summary(out)
    assert s["adapter"] == "lokr" and len(s["losses"]) == 4 and all(np.isfinite(s["losses"]))
    # the default --save_format of LoKr: the kohya file (LyCORIS's keys), as diffusers files do not carry it
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "lora_kohya.safetensors", "train_summary.json", "validation"]
    tensors, header = read_safetensors(out / "lora_kohya.safetensors")
    assert header["ss_network_module"] == "lycoris.kohya" and json.loads(header["ss_network_args"])["algo"] == "lokr"
    assert {k.rsplit(".", 1)[1] for k in tensors} <= {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}
    assert sum(k.endswith(".lokr_w1") for k in tensors) > 10

    # the file reloads to the trained model's outputs (the checkpoint holds the exact trained weights)
    from convlora.diffusion import load_pipeline_lora

    reference_pipe = load_pipeline(tiny_base)
    load_lora(reference_pipe.unet, out / "checkpoint-4" / "unet_lora.safetensors")
    reference = unet_out(reference_pipe.unet)
    assert not torch.allclose(reference, unet_out(load_pipeline(tiny_base).unet), atol=1e-4)  # LoKr changed something
    pipe = load_pipeline(tiny_base)
    loaded = load_pipeline_lora(out / "lora_kohya.safetensors", unet=pipe.unet)
    assert loaded["format"] == "kohya" and torch.allclose(unet_out(pipe.unet), reference, atol=1e-6)

    # the validation grid's LoRA tile is the reloaded file at strength 0.5, not at 1
    def image_at(scale: float):
        with lora_scale(pipe.unet, scale):
            return np.asarray(pipe([PROMPT], generator=[torch.Generator().manual_seed(s["seed"])], num_inference_steps=3,
                                   guidance_scale=1.0).images[0]).astype(int)

    grid = np.asarray(Image.open(out / "validation" / "final.png").convert("RGB")).astype(int)
    tile, label_w, gap, header_h = 96, 220, 16, 22  # make_grid's layout: base tile, gap, LoRA tile
    shown = grid[header_h:header_h + tile:3, label_w + tile + gap:label_w + 2 * tile + gap:3]
    half, full = image_at(0.5), image_at(1.0)
    assert np.abs(shown - half).max() <= 2 and np.abs(shown - full).max() > 5  # 4 steps: at 1 it is 10 levels off


def test_loha_dora_resume_mid_run_is_exact_and_another_kind_is_refused_by_name(script, capsys, tiny_base, toy_data, tmp_path):
    # 8 images, batch 2: 4 steps per epoch; checkpoint-3 is inside the first epoch
    common = {"adapter": "loha", "dora_wd": True, "rank": 4, "max_train_steps": 6, "checkpointing_steps": 3, "random_flip": True}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    check_ok(launch(script_args(tiny_base, toy_data, straight, **common)))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    output = check_ok(launch(script_args(tiny_base, toy_data, resumed, resume_from_checkpoint="checkpoint-3", **common)))
    assert "at step 3" in output
    a, b = summary(straight), summary(resumed)
    assert len(a["losses"]) == 6 and a["losses"] == b["losses"] and a["adapter"] == b["adapter"] == "loha+dora"
    ta, tb = read_safetensors(straight / "lora_convlora.safetensors")[0], read_safetensors(resumed / "lora_convlora.safetensors")[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert {k.rsplit(".", 1)[1] for k in ta} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "magnitude"}

    # another kind on resume: refused in this process before any model is loaded, naming the flags
    checkpoint = straight / "checkpoint-3"
    resume = dict(common, resume_from_checkpoint=checkpoint)
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, straight, **dict(resume, adapter="lokr", dora_wd=False)), 1)
    assert line == (f"error: {checkpoint} was made with other settings: --adapter 'loha' (checkpoint) vs 'lokr' (this run); "
                    "--dora_wd True (checkpoint) vs False (this run). Resume with the checkpoint's values, or start a new run "
                    "in another --output_dir")
    # without the settings record the module table still names the kinds
    marker = json.loads((checkpoint / "checkpoint.json").read_text())
    del marker["settings"]
    (checkpoint / "checkpoint.json").write_text(json.dumps(marker))
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, straight, **dict(resume, adapter="lora", dora_wd=False,
                                                                                            save_format="native")), 1)
    assert "unet_lora.safetensors was made with other LoRA settings" in line
    assert "loha+dora rank 4, alpha 4.0 in the checkpoint; rank 4, alpha 4.0 in this run" in line
