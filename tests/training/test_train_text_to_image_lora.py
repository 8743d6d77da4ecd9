"""End-to-end: the real train_scripts/train_text_to_image_lora.py through `accelerate launch`, on the
tiny pipeline, on the CPU. Each test names the behaviour of the script it checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_script_helpers import (REPO, SCRIPT, check_ok, command_line_error, launch, load_pipeline, script_args, summary,
                                  unet_out)

from convlora import load_lora, read_safetensors
from convlora.state import check_finite
from convlora.training.checkpoints import list_checkpoints, read_state, resolve_resume_checkpoint

pytestmark = pytest.mark.slow


def _all_tensors_finite(folder: Path) -> None:
    for path in folder.rglob("*.safetensors"):
        check_finite(read_safetensors(path)[0], source=str(path))


# ---- 1 + 7 + 8: loss, files, validation, logs, metadata ------------------------------------------


def test_trains_saves_loads_back_and_reports(tiny_base, toy_data, tmp_path):
    out = tmp_path / "run"
    result = launch(script_args(
        tiny_base, toy_data, out, train_batch_size=4, max_train_steps=16, learning_rate=3e-3, checkpointing_steps=8,
        save_format=["diffusers", "kohya", "native"], report_to="tensorboard", validation_prompt=["a photo of a sks ball"],
        num_validation_images=2, validation_inference_steps=3, validation_steps=8, validation_guidance_scale=1.0,
    ))
    output = check_ok(result)
    s = summary(out)

    # 1. the loss is finite and goes down on this small fixed set
    losses = s["losses"]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses

    # 1. the files load back -- convlora and diffusers' own loader -- and give the trained model's outputs
    reference_pipe = load_pipeline(tiny_base)
    load_lora(reference_pipe.unet, out / "checkpoint-16" / "unet_lora.safetensors")  # the exact trained weights
    reference = unet_out(reference_pipe.unet)
    assert not torch.allclose(reference, unet_out(load_pipeline(tiny_base).unet), atol=1e-3)  # LoRA changed something
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        pipe = load_pipeline(tiny_base)
        pipe.load_lora_weights(str(out / name))
        assert torch.allclose(unet_out(pipe.unet), reference, atol=1e-5), name
    from convlora.diffusion import load_pipeline_lora

    pipe = load_pipeline(tiny_base)
    loaded = load_pipeline_lora(out / "lora_convlora.safetensors", unet=pipe.unet)
    assert loaded["format"] == "native" and torch.allclose(unet_out(pipe.unet), reference, atol=1e-6)

    # 7. validation: base | LoRA grids (first at step 8), the LoRA images reproduce with the saved file
    grid_8, grid_final = out / "validation" / "step-000008.png", out / "validation" / "final.png"
    assert grid_8.is_file() and grid_final.is_file()
    pipe = load_pipeline(tiny_base)
    pipe.load_lora_weights(str(out))
    images = pipe(["a photo of a sks ball"] * 2, generator=[torch.Generator().manual_seed(s["seed"] + i) for i in range(2)],
                  num_inference_steps=3, guidance_scale=1.0).images
    grid = np.asarray(Image.open(grid_final).convert("RGB")).astype(int)
    tile, label_w, gap, header = 96, 220, 16, 22  # the layout of make_grid: base tiles, gap, LoRA tiles
    for i, image in enumerate(images):
        x0 = label_w + 2 * tile + gap + i * tile
        shown = grid[header:header + tile:3, x0:x0 + tile:3]  # undo the 3x nearest upscale
        assert np.abs(shown - np.asarray(image).astype(int)).max() <= 2
    base_pipe = load_pipeline(tiny_base)
    base_images = base_pipe(["a photo of a sks ball"] * 2, generator=[torch.Generator().manual_seed(s["seed"] + i) for i in range(2)],
                            num_inference_steps=3, guidance_scale=1.0).images
    for i, image in enumerate(base_images):
        shown = grid[header:header + tile:3, label_w + i * tile:label_w + (i + 1) * tile:3]
        assert np.abs(shown - np.asarray(image).astype(int)).max() <= 2

    # 7. tensorboard has the loss curve and the grid; tqdm showed step, loss and lr; the end lists the outputs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Scalars("train_loss")) == 16 and len(events.Scalars("lr")) == 16
    assert "validation/grid" in events.Tags()["images"]
    assert "Steps: 100%" in output and "loss=" in output and "lr=" in output and "step=16" in output
    for label in ("LoRA (diffusers):", "LoRA (kohya):", "LoRA (native):", "validation grid:", "tensorboard:", "summary:"):
        assert label in output
    for path in s["outputs"].values():
        assert Path(path.split()[0].rstrip(",")).exists()

    # 8. the files say how they were made
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "lora_convlora.safetensors"):
        _, header = read_safetensors(out / name)
        assert header["base_model"] == str(tiny_base) and header["ss_sd_model_name"] == str(tiny_base)
        assert (header["unet_preset"], header["rank"], header["alpha"]) == ("full", "4", "4")
        assert (header["steps"], header["resolution"], header["num_train_images"]) == ("16", "32", "8")
        assert header["ss_steps"] == "16" and header["ss_num_train_images"] == "8"
    _, kohya = read_safetensors(out / "lora_kohya.safetensors")
    assert kohya["ss_network_dim"] == "4" and json.loads(kohya["ss_network_args"])["conv_dim"] == "4"


# ---- 2: mixed precision from the accelerate config -----------------------------------------------


def test_bf16_set_only_in_the_accelerate_config(tiny_base, toy_data, tmp_path):
    config = tmp_path / "bf16.yaml"
    config.write_text((REPO / "accelerate_config.yaml").read_text().replace("mixed_precision: 'no'", "mixed_precision: bf16"))
    out = tmp_path / "bf16"
    output = check_ok(launch(script_args(
        tiny_base, toy_data, out, max_train_steps=3, cache_latents=True, center_crop=True,
        validation_prompt=["a photo of a sks ball"], num_validation_images=1, validation_inference_steps=2, validation_steps=1,
    ), config=config))
    s = summary(out)
    assert s["mixed_precision"] == "bf16"  # not passed to the script: read from accelerate
    assert s["dtypes"]["unet"] == {"frozen": ["torch.bfloat16"], "trainable": ["torch.float32"]}  # after validations too
    assert s["dtypes"]["vae"]["frozen"] == ["torch.bfloat16"] and s["dtypes"]["text_encoder"]["frozen"] == ["torch.bfloat16"]
    assert "Attempting to unscale" not in output and all(np.isfinite(s["losses"]))
    tensors, header = read_safetensors(out / "lora_convlora.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32} and header["mixed_precision"] == "bf16"
    assert header["ss_cache_latents"] == "True"
    assert (out / "validation" / "step-000001.png").is_file()


def test_fp16_on_cpu_is_a_clear_error(tiny_base, toy_data, tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), *script_args(tiny_base, toy_data, tmp_path / "x", mixed_precision="fp16")],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode != 0 and "fp16 mixed precision needs a GPU" in result.stderr


# ---- 4 + 5: atomic checkpoints, SIGKILL while saving, exact resume ------------------------------


def test_sigkill_while_saving_then_exact_resume(tiny_base, toy_data, tmp_path):
    # 8 images, batch 1, 2 accumulated batches per step: 4 steps per epoch; checkpoints every 3
    # steps, so the resume starts mid-epoch. Every random feature is on.
    common = dict(
        train_batch_size=1, gradient_accumulation_steps=2, max_train_steps=9, checkpointing_steps=3, checkpoints_total_limit=2,
        lr_scheduler="cosine", lr_warmup_steps=2, train_text_encoder=True, snr_gamma=5.0, noise_offset=0.05,
        random_flip=True, caption_dropout=0.2, lora_dropout=0.1, conv_rank=2,
    )
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    check_ok(launch(script_args(tiny_base, toy_data, straight, **common)))
    assert [p.name for _, p in list_checkpoints(straight)] == ["checkpoint-6", "checkpoint-9"]  # rotated

    ready = tmp_path / "saving-6"
    log = tmp_path / "killed.log"
    proc = launch(script_args(tiny_base, toy_data, killed, **common), new_session=True, wait=False, log=log,
                  faults={"hang_in_checkpoint": {"step": 6, "ready_file": str(ready)}})
    try:
        deadline = time.time() + 600
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert ready.exists(), log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the training process, mid-save
    finally:
        proc.wait()
    partial = Path(ready.read_text())
    assert partial.is_dir() and partial.name.startswith(".checkpoint-6.tmp-") and any(partial.iterdir())
    assert not (killed / "checkpoint-6").exists()
    with pytest.warns(UserWarning, match="ignoring incomplete"):
        assert resolve_resume_checkpoint("latest", killed) == killed / "checkpoint-3"
    previous = killed / "checkpoint-3"
    assert read_state(previous, "progress")["global_step"] == 3 and len(read_state(previous, "optimizer")["state"]) > 0
    read_safetensors(previous / "unet_lora.safetensors")

    output = check_ok(launch(script_args(tiny_base, toy_data, killed, resume_from_checkpoint="latest", **common)))
    assert "Resumed from" in output and "checkpoint-3 at step 3" in output
    assert not partial.exists()  # cleaned up once newer checkpoints were complete
    a, b = summary(straight), summary(killed)
    assert a["losses"] == b["losses"] and a["learning_rates"] == b["learning_rates"] and a["skipped_steps"] == b["skipped_steps"] == []
    for step in (6, 9):
        sa, sb = straight / f"checkpoint-{step}", killed / f"checkpoint-{step}"
        for name in ("unet_lora.safetensors", "text_encoder_lora.safetensors", "optimizer.safetensors"):
            ta, tb = read_safetensors(sa / name)[0], read_safetensors(sb / name)[0]
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), (step, name)
        for name in ("optimizer", "lr_scheduler", "progress"):
            assert (sa / f"{name}.json").read_text() == (sb / f"{name}.json").read_text(), (step, name)
    ta, tb = read_safetensors(straight / "lora_convlora.safetensors")[0], read_safetensors(killed / "lora_convlora.safetensors")[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _wide_images(folder: Path, n: int = 8) -> Path:
    """``n`` 40x32 images (a random crop to 32 moves) with two captions each."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": [f"a photo of a sks ball {i}", f"a sks ball {i}"]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_resume_mid_way_through_a_later_epoch_is_exact(tiny_base, tmp_path):
    # 8 images, batch 2: 4 steps per epoch; checkpoint-10 is half-way through epoch 2 (0-based).
    # Random crop, random flip and caption dropout on, so every epoch draws differently.
    # (AdamW8bit's exact resume is the prior-preservation resume test below.)
    data = _wide_images(tmp_path / "wide")
    common = dict(max_train_steps=12, checkpointing_steps=10, random_flip=True, caption_dropout=0.3, lora_dropout=0.1,
                  lr_scheduler="cosine", lr_warmup_steps=2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    check_ok(launch(script_args(tiny_base, data, straight, **common)))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-10", resumed / "checkpoint-10")
    output = check_ok(launch(script_args(tiny_base, data, resumed, resume_from_checkpoint="checkpoint-10", **common)))
    assert "at step 10" in output
    a, b = summary(straight), summary(resumed)
    assert len(a["losses"]) == 12 and a["losses"] == b["losses"] and a["learning_rates"] == b["learning_rates"]
    assert all(np.isfinite(a["losses"])) and a["skipped_steps"] == []
    ta, tb = read_safetensors(straight / "lora_convlora.safetensors")[0], read_safetensors(resumed / "lora_convlora.safetensors")[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert all(bool(ta[k].abs().max() > 0) for k in ta if k.endswith("lora_B"))  # trained: B starts at zero
    state = read_safetensors(straight / "checkpoint-10" / "optimizer.safetensors")[0]
    assert [k for k, t in state.items() if t.dtype == torch.uint8] == []  # plain AdamW: 32-bit state


def test_resume_with_prior_preservation_from_kohya_folders_is_exact_and_keeps_the_prior_settings(script, capsys, tiny_base,
                                                                                                  tmp_path):
    # 8 instance images in a "2_" folder (16 per epoch) + 3 regularisation images repeated 2x; batch 2 -> 8 steps
    # per epoch, checkpoint-10 is in epoch 1. The prior settings are in the checkpoint and the files.
    # AdamW8bit (bitsandbytes, on the CPU) at rank 16: the LoRA tensors of >= 4096 elements (the 3x3
    # convs' A, 16 x 64*9) get 8-bit state, the others 32-bit state; both are in the checkpoint.
    instances, reg = tmp_path / "instances" / "2_sks ball", tmp_path / "reg" / "2_a photo of a coat"
    _wide_images(tmp_path / "wide")
    instances.parent.mkdir()
    shutil.copytree(tmp_path / "wide", instances, ignore=shutil.ignore_patterns("metadata.jsonl"))
    reg.parent.mkdir()
    shutil.copytree(tmp_path / "wide", reg, ignore=shutil.ignore_patterns("metadata.jsonl", "[3-7].png"))
    common = dict(max_train_steps=12, checkpointing_steps=10, random_flip=True, caption_dropout=0.3, lr_scheduler="cosine",
                  lr_warmup_steps=2, with_prior_preservation=True, reg_data_dir=tmp_path / "reg", prior_loss_weight=0.5, prior_target="base",
                  save_format=["native", "kohya"], use_8bit_adam=True, rank=16)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    output = check_ok(launch(script_args(tiny_base, instances.parent, straight, **common)))
    assert "16 images + 6 class images (prior preservation), 12 steps (2 epochs)" in output
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-10", resumed / "checkpoint-10")
    check_ok(launch(script_args(tiny_base, instances.parent, resumed, resume_from_checkpoint="checkpoint-10", **common)))
    a, b = summary(straight), summary(resumed)
    assert len(a["losses"]) == 12 and a["losses"] == b["losses"] and a["learning_rates"] == b["learning_rates"]
    ta, tb = read_safetensors(straight / "lora_convlora.safetensors")[0], read_safetensors(resumed / "lora_convlora.safetensors")[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert all(bool(ta[k].abs().max() > 0) for k in ta if k.endswith("lora_B"))  # trained: B starts at zero
    state = read_safetensors(straight / "checkpoint-10" / "optimizer.safetensors")[0]
    uint8 = [k for k, t in state.items() if t.dtype == torch.uint8]
    assert len(uint8) > 0 and all(k.endswith((".state1", ".state2")) for k in uint8)
    _, header = read_safetensors(straight / "lora_kohya.safetensors")
    assert (header["with_prior_preservation"], header["prior_loss_weight"], header["num_class_images"]) == ("True", "0.5", "6")
    assert json.loads(header["ss_dataset_dirs"]) == {"2_sks ball": {"n_repeats": 2, "img_count": 8}}
    assert json.loads(header["ss_reg_dataset_dirs"]) == {"2_a photo of a coat": {"n_repeats": 2, "img_count": 3}}
    assert header["ss_num_train_images"] == "16" and header["ss_prior_loss_weight"] == "0.5"
    # other prior settings on resume: refused (in this process; test_resume_path_that_does_not_exist_is_an_error
    # and test_argument_and_output_dir_errors_in_a_real_process refuse in a real process)
    assert header["prior_target"] == "base"
    for change, named in ((dict(prior_loss_weight=1.0), "--prior_loss_weight 0.5 (checkpoint) vs 1.0 (this run)"),
                          (dict(prior_target="noise"), "--prior_target 'base' (checkpoint) vs 'noise' (this run)"),
                          (dict(with_prior_preservation=False, reg_data_dir=None, prior_target=None),
                           "--with_prior_preservation True (checkpoint) vs None")):
        line = command_line_error(script, capsys, script_args(tiny_base, instances.parent, resumed, **{
            **common, **change, "resume_from_checkpoint": "checkpoint-10"}), 1)
        assert named in line, line


def test_resume_path_that_does_not_exist_is_an_error(tiny_base, toy_data, tmp_path):
    line = _error_line(_run_plain(script_args(tiny_base, toy_data, tmp_path / "out", resume_from_checkpoint=tmp_path / "checkpoint-5")), 1)
    assert line == (f"error: --resume_from_checkpoint {str(tmp_path / 'checkpoint-5')!r}: no such checkpoint folder. "
                    "Use 'latest' to continue from the newest checkpoint if there is one.")
    assert not (tmp_path / "out" / "train_summary.json").exists()


# ---- 6: non-finite losses ------------------------------------------------------------------------


def test_nan_steps_are_skipped_then_stop_the_run_and_nothing_non_finite_is_written(tiny_base, toy_data, tmp_path):
    # Step 3 alone is NaN (skipped, reported, training goes on); steps 5, 6, 7 in a row stop the run.
    out = tmp_path / "nans"
    result = launch(script_args(tiny_base, toy_data, out, max_train_steps=10, checkpointing_steps=2, max_consecutive_nonfinite_steps=3,
                                save_format=["diffusers", "native"]), faults={"nan_loss_at_steps": [3, 5, 6, 7]})
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "step 3: loss is nan (non-finite); the update was skipped" in output
    assert "step 4: loss" not in output  # step 4 trained normally
    assert "the loss was NaN/inf in 3 steps in a row (up to step 7); stopping" in output
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    progress = read_state(out / "checkpoint-6", "progress")
    assert progress["skipped_steps"] == [3, 5, 6] and progress["losses"][2] is None and progress["losses"][3] is not None
    lrs = progress["learning_rates"]
    assert lrs[2] == lrs[1]  # the schedule does not advance on a skipped step
    # A skipped step leaves the weights as they were: checkpoint-6 holds the weights of step 4.
    w4, w6 = read_safetensors(out / "checkpoint-4" / "unet_lora.safetensors")[0], read_safetensors(out / "checkpoint-6" / "unet_lora.safetensors")[0]
    assert all(torch.equal(w4[k], w6[k]) for k in w4)
    _all_tensors_finite(out)
    assert not list(out.glob("*.safetensors")) and not (out / "train_summary.json").exists()


# ---- the embedded default ------------------------------------------------------------------------


def test_no_model_or_data_arguments_uses_the_embedded_default(tmp_path):
    out = tmp_path / "embedded"
    result = launch(["--output_dir", str(out), "--max_train_steps", "2", "--num_validation_images", "2",
                     "--validation_inference_steps", "2", "--report_to", "none"])
    output = check_ok(result)
    s = summary(out)
    shipped = (REPO / "examples" / "tiny-sd-fashion" / "model_index.json").is_file()
    assert s["base_model"] == (str(REPO / "examples" / "tiny-sd-fashion") if shipped else str(out / "embedded-stand-in" / "tiny-sd"))
    assert s["global_step"] == 2 and (out / "validation" / "final.png").is_file()
    if shipped:
        assert s["train_data"] == str(REPO / "examples" / "sks-bag")
    if (REPO / "examples" / "tiny-sd-fashion" / "classifier" / "model.safetensors").is_file():
        assert set(s["concept_scores"]) == {"bag", "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                                            "sneaker", "ankle boot"}
        assert s["prior_preservation"]["class_data_dir"] == str(REPO / "examples" / "fashion-prior")  # shipped, not made
        assert s["prior_preservation"]["num_class_images_used"] == 288
        assert "concept score 'bag' ('a photo of a sks bag'): base" in output
    _, header = read_safetensors(out / "pytorch_lora_weights.safetensors")
    assert header["unet_preset"] == "attn" and header["rank"] == "43" and header["resolution"] == "32"
    assert header["cache_text_embeddings"] == "True" and "Cached the text embeddings of 10 captions" in output
    assert read_safetensors(out / "lora_kohya.safetensors")[1]["ss_cache_latents"] == "True"


@pytest.mark.skipif(not (REPO / "examples" / "fashion-prior" / "class_images.json").is_file(), reason="no shipped class images")
def test_the_shipped_class_images_are_what_the_script_makes_for_the_embedded_run(script, tmp_path):
    # The first class prompt's 32 images made again by the script's own prior step (the seeds depend on the
    # prompt text and image index, not on the other prompts), compared with the shipped ones.
    from accelerate import Accelerator

    shipped = REPO / "examples" / "fashion-prior"
    prompt = script.EMBEDDED_CLASS_PROMPTS[0]
    args = script.parse_args(["--class_data_dir", str(tmp_path / "made"), "--class_prompt", prompt])
    script.prepare_embedded_default(args, is_main=True)
    script.prepare_class_images(args, Accelerator(cpu=True))
    record = json.loads((shipped / "class_images.json").read_text())
    assert record["settings"]["prompts"][0] == prompt and record["counts"] == [32] * 9
    made = [np.asarray(Image.open(tmp_path / "made" / f"p00-{i:05d}.png"), dtype=np.int16) for i in range(32)]
    kept = [np.asarray(Image.open(shipped / f"p00-{i:05d}.png"), dtype=np.int16) for i in range(32)]
    worst = max(int(np.abs(a - b).max()) for a, b in zip(made, kept))
    assert worst <= 2, worst  # uint8 levels; another torch thread count may move the last bits of a float


# ---- bad input end to end: one line, exit 1 or 2, nothing half-written ----------------------------


def _run_plain(args: list[str]):
    """The script as `python train_text_to_image_lora.py ...` (the launcher adds its own traceback)."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, timeout=600)


def _error_line(result, code: int) -> str:
    """The one error line (the progress bar may be redrawn after it)."""
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_argument_and_output_dir_errors_in_a_real_process(tiny_base, toy_data, tmp_path):
    line = _error_line(_run_plain(script_args(tiny_base, toy_data, tmp_path / "a", checkpoints_total_limit=0)), 2)
    assert line == "train_text_to_image_lora.py: error: --checkpoints_total_limit must be >= 1, got 0 (see --help)"
    (tmp_path / "file").write_text("x")
    line = _error_line(_run_plain(script_args(tiny_base, toy_data, tmp_path / "file")), 1)
    assert line == f"error: --output_dir {tmp_path / 'file'} is an existing file, not a folder"


def test_resume_refusals_and_clean_up_of_killed_saves(script, capsys, tiny_base, toy_data, tmp_path):
    out = tmp_path / "run"
    leftovers = [out / ".checkpoint-2.tmp-a1b2c3d4", out / ".lora_convlora.safetensors.a1b2c3d4.tmp"]
    leftovers[0].mkdir(parents=True)
    (leftovers[0] / "optimizer.safetensors").write_bytes(b"0" * 4096)
    leftovers[1].write_bytes(b"0" * 4096)
    common = dict(max_train_steps=4, checkpointing_steps=2, rank=4, lora_alpha=4)
    check_ok(launch(script_args(tiny_base, toy_data, out, **common)))
    assert not any(path.exists() for path in leftovers)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "lora_convlora.safetensors", "train_summary.json"]

    # the refusals run in this process (test_resume_path_that_does_not_exist_is_an_error refuses a resume in a real one)
    # another alpha: refused before any model is loaded, naming both values
    resume = dict(common, max_train_steps=6, resume_from_checkpoint="checkpoint-2")
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, out, **dict(resume, lora_alpha=16)), 1)
    assert line.startswith(f"error: {out / 'checkpoint-2'} was made with other settings: --lora_alpha 4.0 (checkpoint) vs 16.0 (this run)")
    # a checkpoint without the settings record: the modules' own ranks and alphas are compared
    marker = json.loads((out / "checkpoint-2" / "checkpoint.json").read_text())
    del marker["settings"]
    (out / "checkpoint-2" / "checkpoint.json").write_text(json.dumps(marker))
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, out, **dict(resume, lora_alpha=16)), 1)
    assert "unet_lora.safetensors was made with other LoRA settings" in line and "alpha 4.0 in the checkpoint" in line
    assert "alpha 16.0 in this run" in line
    # a pruned checkpoint
    (out / "checkpoint-2" / "optimizer.safetensors").unlink()
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, out, **resume), 1)
    assert line == f"error: checkpoint {out / 'checkpoint-2'} is missing optimizer.safetensors; resume from another checkpoint"
    # nothing was changed by the refusals
    assert read_state(out / "checkpoint-4", "progress")["global_step"] == 4 and summary(out)["global_step"] == 4


def test_a_disk_that_fills_up_during_training(tiny_base, toy_data, tiny_filesystem):
    # 64 KiB: the start-up check passes, the first checkpoint (about 1.7 MB) does not fit
    result = _run_plain(script_args(tiny_base, toy_data, tiny_filesystem, max_train_steps=2, checkpointing_steps=1))
    line = _error_line(result, 1)
    assert line.startswith(f"error: cannot write checkpoint-1 in {tiny_filesystem}: ") and "No space left on device" in line
    assert list(tiny_filesystem.iterdir()) == []  # no temporary folder or file left
