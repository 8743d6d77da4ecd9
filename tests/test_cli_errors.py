"""Every `convlora` command on malformed files: one line on stderr, exit status 1 or 2, no traceback.

And `convlora merge`'s output rules: never over its own input without --overwrite, the stored
dtypes kept, and no half-written folder when the disk fills up.
"""

from __future__ import annotations

import hashlib
import json
import resource
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from convlora.cli import main
from convlora.diffusion import inject_pipeline_lora, save_pipeline_lora, unet_lora_config
from convlora.io import read_safetensors
from convlora.testing import randomize_lora_


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny pipeline folder stored as the embedded default is: fp16 UNet / VAE, fp32 text encoder."""
    from convlora.diffusion.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.unet.to(torch.float16)
    pipe.vae.to(torch.float16)
    folder = tmp_path_factory.mktemp("pipe") / "tiny-sd"
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text("not written by save_pretrained\n")
    return folder


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """The same attn-preset UNet LoRA as diffusers, native and kohya files."""
    from convlora.diffusion.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    inject_pipeline_lora(pipe, unet_lora_config("attn", rank=2, alpha=4))
    randomize_lora_(pipe.unet, seed=0)
    folder = tmp_path_factory.mktemp("lora")
    return {
        fmt: save_pipeline_lora(folder / f"{fmt}.safetensors", unet=pipe.unet, format=fmt)
        for fmt in ("diffusers", "native", "kohya")
    }


def _rewrite(src: Path, dst: Path, tensors=None, header=None) -> Path:
    old_tensors, old_header = read_safetensors(src)
    tensors = old_tensors if tensors is None else tensors(old_tensors)
    header = old_header if header is None else header(old_header)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=header)
    return dst


def _first_module_entry(edit):
    def change(header):
        table = json.loads(header["convlora_modules"])
        edit(table[sorted(table)[0]])
        return {**header, "convlora_modules": json.dumps(table)}

    return change


def _kohya_alpha(value):
    def change(tensors):
        key = next(k for k in sorted(tensors) if k.endswith(".alpha"))
        return {**tensors, key: value}

    return change


MALFORMED = {
    "lora_adapter_metadata is a list": ("diffusers", None, lambda h: {**h, "lora_adapter_metadata": "[1]"}),
    "lora_adapter_metadata is null": ("diffusers", None, lambda h: {**h, "lora_adapter_metadata": "null"}),
    "lora_adapter_metadata is a number": ("diffusers", None, lambda h: {**h, "lora_adapter_metadata": "3"}),
    "alpha_pattern holds an invalid regex": (
        "diffusers", None, lambda h: {**h, "lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.alpha_pattern": {"to_(q": 1}})},
    ),
    "convlora_modules is a list": ("native", None, lambda h: {**h, "convlora_modules": "[]"}),
    "convlora_modules is null": ("native", None, lambda h: {**h, "convlora_modules": "null"}),
    "convlora_modules is a number": ("native", None, lambda h: {**h, "convlora_modules": "1.5"}),
    "convlora_config is a list": ("native", None, lambda h: {**h, "convlora_config": "[]"}),
    "convlora_config is null": ("native", None, lambda h: {**h, "convlora_config": "null"}),
    "a module entry without alpha": ("native", None, _first_module_entry(lambda e: e.pop("alpha"))),
    "a module entry with alpha 'abc'": ("native", None, _first_module_entry(lambda e: e.__setitem__("alpha", "abc"))),
    "a kohya .alpha with 2 elements": ("kohya", _kohya_alpha(torch.tensor([1.0, 2.0])), None),
    "a kohya .alpha with 0 elements": ("kohya", _kohya_alpha(torch.tensor([])), None),
    "a kohya .alpha of NaN": ("kohya", _kohya_alpha(torch.tensor(float("nan"))), None),
}  # fmt: skip


@pytest.fixture(params=sorted(MALFORMED))
def malformed(request, lora_files, tmp_path):
    fmt, tensors, header = MALFORMED[request.param]
    return _rewrite(lora_files[fmt], tmp_path / f"bad-{fmt}.safetensors", tensors, header)


@pytest.fixture
def peft_list_config(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({"base_model.model.conv_in.lora_A.weight": torch.randn(2, 4, 3, 3),
               "base_model.model.conv_in.lora_B.weight": torch.randn(32, 2, 1, 1)},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    (folder / "adapter_config.json").write_text("[1, 2]")
    return folder


def _commands(file: Path, pipeline_dir: Path, tmp_path: Path) -> dict[str, list[str]]:
    return {
        "inspect": ["inspect", str(file)],
        "convert": ["convert", str(file), str(tmp_path / "out.safetensors"), "--to", "kohya"],
        "doctor": ["doctor", str(file)],
        "merge": ["merge", str(pipeline_dir), str(file), str(tmp_path / "merged")],
    }


def _assert_one_line_error(argv, capsys) -> str:
    status = main(argv)
    captured = capsys.readouterr()
    assert status in (1, 2), argv
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"convlora {argv[0]}: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("command", ["inspect", "convert", "merge"])
def test_malformed_files_give_one_line_errors(malformed, pipeline_dir, tmp_path, capsys, command):
    argv = _commands(malformed, pipeline_dir, tmp_path)[command]
    line = _assert_one_line_error(argv, capsys)
    assert str(malformed) in line
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "merged").exists()


def test_doctor_reports_malformed_files_without_a_traceback(malformed, capsys):
    assert main(["doctor", str(malformed)]) == 1
    out = capsys.readouterr().out
    assert "[   no] convlora (load_pipeline_lora / convert)" in out and str(malformed) in out


@pytest.mark.parametrize("command", ["inspect", "convert", "doctor", "merge"])
def test_peft_config_that_is_a_list_gives_one_line_errors(peft_list_config, pipeline_dir, tmp_path, capsys, command):
    argv = _commands(peft_list_config, pipeline_dir, tmp_path)[command]
    line = _assert_one_line_error(argv, capsys)
    assert "adapter_config.json must be a JSON object, got a JSON array" in line


# ---- merge: its output folder -------------------------------------------------------------------------
def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_into_its_own_input_needs_overwrite(pipeline_dir, lora_files, tmp_path, capsys):
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_dir, folder)
    before = _digest(folder)
    line = _assert_one_line_error(["merge", str(folder), str(lora_files["diffusers"]), str(folder)], capsys)
    assert "is the input pipeline folder; pass --overwrite" in line
    assert _digest(folder) == before
    line = _assert_one_line_error(["merge", str(folder), str(lora_files["diffusers"]), str(pipeline_dir.parent)], capsys)
    assert "exists and is not empty; pass --overwrite" in line

    assert main(["merge", str(folder), str(lora_files["diffusers"]), str(folder), "--overwrite"]) == 0
    after = _digest(folder)
    assert after["README.md"] == before["README.md"], "files the pipeline does not write are kept"
    assert after["unet/diffusion_pytorch_model.safetensors"] != before["unet/diffusion_pytorch_model.safetensors"]
    assert after["vae/diffusion_pytorch_model.safetensors"] == before["vae/diffusion_pytorch_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder is left"
    merged = UNet2DConditionModel.from_pretrained(folder / "unet")
    original = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    tensors, _ = read_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}, "an fp16 base stays fp16"
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert len(changed) == 48 and all(k.endswith(".weight") and ".attn" in k for k in changed)  # the attn preset's 48


def test_merge_on_a_full_disk_leaves_no_folder(pipeline_dir, lora_files, tmp_path, capsys):
    """A real write failure: a file-size limit (RLIMIT_FSIZE, as a full disk does) stops the UNet's file part-way."""
    out = tmp_path / "merged"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing pytest
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        line = _assert_one_line_error(["merge", str(pipeline_dir), str(lora_files["diffusers"]), str(out)], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert "File too large" in line
    assert list(tmp_path.iterdir()) == [], "neither the output folder nor a temporary one is left"
