"""Bad input to the training script: a one-line named error and exit code 1 or 2, before any training.

In process (fast): ``command_line`` is what ``python train_text_to_image_lora.py`` runs. The
checkpoints here are written with the script's own file list and settings record, without training
(the end-to-end resume refusals are in test_train_text_to_image_lora.py).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from train_script_helpers import command_line_error, script_args

from convlora.training.checkpoints import save_checkpoint, write_state
from convlora.training.data import write_toy_dataset

# ---- arguments: refused at the start, one line, exit 2 ------------------------------------------


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("checkpoints_total_limit", 0, "--checkpoints_total_limit must be >= 1, got 0"),
        ("lora_dropout", 1.0, r"--lora_dropout must be in \[0, 1\), got 1.0"),
        ("max_train_steps", 0, "--max_train_steps must be >= 1, got 0"),
        ("num_train_epochs", 0, "--num_train_epochs must be >= 1, got 0"),
        ("caption_dropout", 1.5, r"--caption_dropout must be in \[0, 1\], got 1.5"),
        ("learning_rate", "nan", "--learning_rate must be > 0, got nan"),
        ("lora_alpha", -4, "--lora_alpha must be > 0, got -4.0"),
        ("noise_offset", "inf", "--noise_offset must be >= 0, got inf"),
        ("validation_lora_scale", "nan", "--validation_lora_scale must be finite, got nan"),
    ],
)
def test_argument_out_of_range_is_one_line_exit_2(script, capsys, tiny_base, toy_data, tmp_path, flag, value, message):
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, tmp_path / "out", **{flag: value}), code=2)
    assert re.search(rf": error: {message} \(see --help\)$", line), line
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_conv_settings_on_a_preset_without_convs_are_refused(script, capsys, tiny_base, toy_data, tmp_path):
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, tmp_path / "out", unet_preset="attn", conv_rank=2), code=2)
    assert "--unet_preset attn: conv_rank / conv_alpha apply to 3x3 convs" in line


# ---- the output folder ---------------------------------------------------------------------------


def test_output_dir_that_is_a_file(script, capsys, tiny_base, toy_data, tmp_path):
    (tmp_path / "out").write_text("my notes")
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, tmp_path / "out"))
    assert line == f"error: --output_dir {tmp_path / 'out'} is an existing file, not a folder"
    assert (tmp_path / "out").read_text() == "my notes"


def test_output_dir_on_a_read_only_disk(script, capsys, tiny_base, toy_data, read_only_filesystem):
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, read_only_filesystem / "run"))
    assert line == f"error: --output_dir {read_only_filesystem / 'run'} cannot be created or written: Read-only file system"


def test_output_dir_on_a_full_disk(script, capsys, tiny_base, toy_data, full_filesystem):
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, full_filesystem))
    assert line == f"error: --output_dir {full_filesystem} cannot be written: No space left on device"
    assert [p.name for p in full_filesystem.iterdir()] == ["filler"]  # the probe is gone


def test_leftovers_of_killed_saves_are_removed_at_the_start(script, capsys, tiny_base, toy_data, tmp_path):
    out = tmp_path / "out"
    (out / ".checkpoint-6.tmp-k3j4h5g6").mkdir(parents=True)
    (out / ".checkpoint-6.tmp-k3j4h5g6" / "unet_lora.safetensors").write_bytes(b"0" * 4096)
    (out / ".lora_convlora.safetensors.ab12cd34.tmp").write_bytes(b"0" * 4096)
    (out / "keep.txt").write_text("mine")
    command_line_error(script, capsys, script_args(tiny_base, toy_data, out, resolution=36))  # stops after the clean-up
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---- the models ------------------------------------------------------------------------------------


def test_resolution_the_vae_and_unet_cannot_divide(script, capsys, tiny_base, toy_data, tmp_path):
    # the tiny base: VAE with 3 blocks (4x), UNet with 2 down blocks (2x more) -> multiples of 8
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, tmp_path / "out", resolution=30))
    assert line == "error: --resolution 30 is not a multiple of 8 (the VAE downsamples 4x and the UNet 2x more); use 24 or 32"


# ---- the data ----------------------------------------------------------------------------------------


def test_caption_file_with_invalid_utf8(script, capsys, tiny_base, tmp_path):
    data = write_toy_dataset(tmp_path / "data", n=2, size=32)
    (data / "metadata.jsonl").unlink()
    (data / "0000.txt").write_bytes(b"a caf\xe9")
    (data / "0001.txt").write_text("a cat")
    line = command_line_error(script, capsys, script_args(tiny_base, data, tmp_path / "out"))
    assert line == f"error: caption file {data / '0000.txt'} is not valid UTF-8 (byte 5: b'\\xe9'); save it as UTF-8"


def test_metadata_file_name_that_is_a_number(script, capsys, tiny_base, tmp_path):
    data = write_toy_dataset(tmp_path / "data", n=2, size=32)
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": 5, "text": "x"}) + "\n")
    line = command_line_error(script, capsys, script_args(tiny_base, data, tmp_path / "out"))
    assert line == f"error: {data / 'metadata.jsonl'}:1: file_name must be a non-empty path relative to the folder, got 5"


# ---- checkpoints to resume from ------------------------------------------------------------------------


def _checkpoint(script, out, argv_settings, step=2):
    """A complete checkpoint as the script writes it (state files, LoRA file, settings), untrained."""
    # the settings of a run on a model of one's own (the resuming runs below are), not of the embedded one
    settings = script.adapter_settings(script.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                                          *argv_settings]))

    def write(folder):
        (folder / "unet_lora.safetensors").write_bytes(b"not read before the checks")
        write_state(folder, "optimizer", {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": []})
        write_state(folder, "lr_scheduler", {"last_epoch": step})
        write_state(folder, "progress", {"seed": 0, "global_step": step, "losses": [1.0] * step})

    return save_checkpoint(out, step, write, info={"settings": settings})


@pytest.mark.parametrize("missing", ["optimizer.safetensors", "unet_lora.safetensors", "progress.json", "lr_scheduler.json"])
def test_checkpoint_missing_a_file(script, capsys, tiny_base, toy_data, tmp_path, missing):
    out = tmp_path / "out"
    path = _checkpoint(script, out, ["--rank", "4"])
    (path / missing).unlink()
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, out, rank=4, resume_from_checkpoint="latest"))
    assert line == f"error: checkpoint {path} is missing {missing}; resume from another checkpoint"


def test_resuming_with_another_alpha_names_both_values(script, capsys, tiny_base, toy_data, tmp_path):
    out = tmp_path / "out"
    path = _checkpoint(script, out, ["--rank", "4", "--lora_alpha", "4"])
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, out, rank=4, lora_alpha=16, resume_from_checkpoint="latest"))
    assert line.startswith(f"error: {path} was made with other settings: --lora_alpha 4.0 (checkpoint) vs 16.0 (this run); "
                           "--conv_alpha 4.0 (checkpoint) vs 16.0 (this run). Resume with the checkpoint's values")
    # an omitted --lora_alpha means alpha = rank = 4: the same settings, so this one is not refused for them
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, out, rank=4, max_train_steps=1, resume_from_checkpoint="latest"))
    assert line == f"error: {path} is at step 2, past --max_train_steps 1"


def test_base_precision_against_the_compute_dtype():
    # (the script calls this in setup; in process, accelerate's state cannot change mixed precision)
    from convlora.training.precision import base_storage_mode

    assert [base_storage_mode(p, torch.float32) for p in (None, "nf4", "int8", "fp8", "bf16", "fp16", "fp32")] == [
        None, "nf4", "int8", "fp8", "bf16", "fp16", None]
    assert base_storage_mode("bf16", torch.bfloat16) is None and base_storage_mode("fp16", torch.bfloat16) == "fp16"
    with pytest.raises(ValueError, match=r"^--base_precision fp32 with mixed precision bfloat16: the frozen weights are "
                                         r"stored in the mixed-precision dtype; use --mixed_precision no for a float32 base$"):
        base_storage_mode("fp32", torch.bfloat16)
    with pytest.raises(ValueError, match="--base_precision must be one of nf4, int8, fp8, bf16, fp16, fp32, got 'int4'"):
        base_storage_mode("int4", torch.float32)


def test_quantized_base_under_fsdp2_is_refused(script, capsys, tiny_base, toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    line = command_line_error(script, capsys, script_args(tiny_base, toy_data, tmp_path / "out", base_precision="nf4"))
    assert line.endswith("--base_precision nf4 with FSDP2: a quantized base is not sharded; use DDP (MULTI_CPU / MULTI_GPU)")
