"""`convlora resize`, `extract` and `merge-loras` on the tiny pipeline, against references computed here:
numpy SVDs of each module's ΔW, the LoRA that was merged into the weights, the weighted sums."""

from __future__ import annotations

import math

import pytest
import torch

from convlora.cli import main
from convlora.diffusion import inject_pipeline_lora, save_pipeline_lora, text_encoder_lora_config, unet_lora_config
from convlora.formats import LoRAWeights, read_lora_file, write_lora_file
from convlora.testing import randomize_lora_


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from convlora.diffusion.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd")


def _adapter(tmp_path_factory, name: str, unet_config, te_config, seed: int):
    from convlora.diffusion.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    inject_pipeline_lora(pipe, unet_config, te_config)
    randomize_lora_(pipe.unet, seed=seed)
    if te_config is not None:
        randomize_lora_(pipe.text_encoder, seed=seed + 1)
    path = tmp_path_factory.mktemp(name) / "pytorch_lora_weights.safetensors"
    text_encoder = pipe.text_encoder if te_config is not None else None
    return save_pipeline_lora(path, unet=pipe.unet, text_encoder=text_encoder, metadata={"base_model": "tiny-sd", "rank": "4"})


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """diffusers file: UNet full preset (rank 4, alpha 8; 3x3 convs rank 2, alpha 1) + text-encoder attn rank 4."""
    config = unet_lora_config("full", rank=4, alpha=8, conv_rank=2, conv_alpha=1)
    return _adapter(tmp_path_factory, "lora", config, text_encoder_lora_config("attn", rank=4), seed=0)


@pytest.fixture(scope="module")
def attn_lora_file(tmp_path_factory):
    """diffusers file: UNet attn preset, rank 6, alpha 3 (a different rank, alpha and module set)."""
    return _adapter(tmp_path_factory, "attn", unet_lora_config("attn", rank=6, alpha=3), None, seed=5)


def dense(module, use_rslora: bool = False) -> torch.Tensor:
    """ΔW flattened to (out, in/groups * prod(k)), float64, computed here."""
    r = module.lora_A.shape[0]
    scaling = module.alpha / (math.sqrt(r) if use_rslora else r)
    return scaling * module.lora_B.double().reshape(-1, r) @ module.lora_A.double().reshape(r, -1)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix)  # torch's full LAPACK SVD in float64 (one thread, as the suite runs)


def best_rank(matrix: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def test_help_lists_the_commands(capsys):
    assert main([]) == 0
    listing = capsys.readouterr().out
    assert "resize" in listing and "extract" in listing and "merge-loras" in listing
    for command in ("resize", "extract", "merge-loras"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--rank" in capsys.readouterr().out


# ---- resize --------------------------------------------------------------------------------------
def test_resize_keeps_the_format_and_gives_best_approximations(lora_file, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    assert main(["resize", str(lora_file), str(out), "--rank", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    _, before = read_lora_file(lora_file)
    fmt, after = read_lora_file(out)
    assert fmt == "diffusers" and after.modules.keys() == before.modules.keys()
    for path, module in before.modules.items():
        new = after.modules[path]
        if module.r <= 3:  # the rank-2 3x3 convs are kept exactly
            assert torch.equal(new.lora_A, module.lora_A) and torch.equal(new.lora_B, module.lora_B) and new.alpha == module.alpha
        else:
            assert new.r == 3 and new.alpha == pytest.approx(module.alpha / module.r * 3)
            assert rel(dense(new), best_rank(dense(module), 3)) < 1e-4
    assert after.metadata["base_model"] == "tiny-sd" and after.metadata["rank"] == "3"
    assert after.metadata["ss_training_comment"] == "convlora resize from rank 4 to rank 3"
    conv = "unet.down_blocks.0.resnets.0.conv1"
    assert f"{conv}: rank 2 -> 2, Frobenius retained 100.00%" in lines
    assert len(lines) == len(before.modules) + 1
    assert lines[-1].startswith("resized 111 of 137 modules (26 kept as they were); Frobenius retained: mean ")
    assert lines[-1].endswith(f"{lora_file} (diffusers) -> {out}")


def test_resize_kohya_file_dynamic(lora_file, tmp_path, capsys):
    kohya = tmp_path / "k.safetensors"
    assert main(["convert", str(lora_file), str(kohya), "--to", "kohya"]) == 0
    out = tmp_path / "dyn.safetensors"
    assert main(["resize", str(kohya), str(out), "--rank", "4", "--dynamic", "sv_fro", "--dynamic_param", "0.9"]) == 0
    _, before = read_lora_file(kohya)
    fmt, after = read_lora_file(out)
    assert fmt == "kohya"
    for path, module in before.modules.items():
        s = singular_values(dense(module))[: module.r]
        fewest = int(torch.nonzero((s**2).cumsum(0) / (s**2).sum() >= 0.9**2)[0]) + 1
        expected = min(fewest + 1, module.r)  # kohya keeps one more, capped at --rank and the module's rank
        assert after.modules[path].r == expected, path
        assert rel(dense(after.modules[path]), best_rank(dense(module), expected)) < 1e-4
    assert after.metadata["ss_training_comment"] == "convlora resize from rank 4 dynamic sv_fro 0.9, at most rank 4"


# ---- extract -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged_dir(pipeline_dir, lora_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "merged"
    assert main(["merge", str(pipeline_dir), str(lora_file), str(out)]) == 0
    return out


def test_extract_from_a_merged_pipeline_gives_back_the_lora(pipeline_dir, merged_dir, lora_file, tmp_path, capsys):
    out = tmp_path / "extracted.safetensors"
    assert main(["extract", str(pipeline_dir), str(merged_dir), str(out), "--rank", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    _, lora = read_lora_file(lora_file)
    got_fmt, extracted = read_lora_file(out)
    assert got_fmt == "diffusers" and extracted.modules.keys() == lora.modules.keys()  # unchanged modules skipped
    for path, module in lora.modules.items():
        assert extracted.modules[path].r == min(4, module.r if not module.is_spatial_conv else 4)
        assert rel(dense(extracted.modules[path]), dense(module)) < 1e-4, path
    assert f"extracted 137 modules; skipped {len(_adaptable(pipeline_dir)) - 137} with max|dW| <= 0" in lines
    assert not any("other tensor" in line for line in lines)  # merge changes only the adapted weights
    assert extracted.metadata["base_model"] == str(pipeline_dir)


def _adaptable(pipeline_dir) -> list[str]:
    from convlora.diffusion.pipeline import build_pipeline_skeleton
    from convlora.extract import adaptable_modules

    return [p for name, model in build_pipeline_skeleton(pipeline_dir).items() for p in adaptable_modules(model)]


def test_extract_single_models_conv_rank_and_peft(pipeline_dir, merged_dir, lora_file, tmp_path, capsys):
    out = tmp_path / "unet_peft"
    args = ["extract", str(pipeline_dir / "unet"), str(merged_dir / "unet"), str(out),
            "--rank", "1", "--conv-rank", "2", "--format", "peft"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{merged_dir / 'unet'} - {pipeline_dir / 'unet'} -> {out} (peft)"
    fmt, extracted = read_lora_file(out)
    _, lora = read_lora_file(lora_file)
    unet = lora.component("unet")
    assert fmt == "peft" and extracted.modules.keys() == unet.keys()
    for path, module in unet.items():
        k = 2 if module.is_spatial_conv else 1
        assert extracted.modules[path].r == k
        assert rel(dense(extracted.modules[path]), best_rank(dense(module), k)) < 1e-4, path


def test_extract_counts_what_a_lora_cannot_carry_and_min_diff(pipeline_dir, merged_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    tuned = tmp_path / "tuned"
    import shutil

    shutil.copytree(merged_dir / "text_encoder", tuned)
    tensors = load_file(tuned / "model.safetensors")
    tensors["final_layer_norm.weight"] = tensors["final_layer_norm.weight"] + 0.5
    save_file(tensors, tuned / "model.safetensors")
    out = tmp_path / "te.safetensors"
    assert main(["extract", str(pipeline_dir / "text_encoder"), str(tuned), str(out), "--rank", "4", "--min-diff", "1e9"]) == 2
    assert "TUNED does not differ from BASE in any Linear / Conv weight (by more than --min-diff 1e+09)" in capsys.readouterr().err
    assert not out.exists()
    assert main(["extract", str(pipeline_dir / "text_encoder"), str(tuned), str(out), "--rank", "4", "--component", "text_encoder",
                 "--format", "kohya"]) == 0  # fmt: skip
    assert "1 other tensor(s) differ, which a LoRA cannot carry: final_layer_norm.weight" in capsys.readouterr().out
    assert read_lora_file(out)[1].components() == ["text_encoder"]


def test_extract_refuses_different_architectures(pipeline_dir, tmp_path, capsys):
    from convlora.diffusion.tiny import save_tiny_sdxl_pipeline

    other = save_tiny_sdxl_pipeline(tmp_path / "xl")
    out = tmp_path / "x.safetensors"
    assert main(["extract", str(pipeline_dir), str(other), str(out), "--rank", "2"]) == 2
    assert "BASE has components ['text_encoder', 'unet'], TUNED ['text_encoder', 'text_encoder_2', 'unet']" in capsys.readouterr().err
    assert main(["extract", str(pipeline_dir / "unet"), str(other / "unet"), str(out), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convlora extract: error: BASE and TUNED are different architectures: ") and err.count("\n") == 1
    assert "down_blocks.1.attentions.0.proj_in: BASE Conv2d (64, 64, 1, 1), TUNED Linear (64, 64)" in err
    assert not out.exists()


# ---- merge-loras ---------------------------------------------------------------------------------
def test_merge_loras_of_two_formats_is_the_weighted_sum(lora_file, attn_lora_file, tmp_path, capsys):
    kohya = tmp_path / "attn_kohya.safetensors"
    assert main(["convert", str(attn_lora_file), str(kohya), "--to", "kohya"]) == 0
    out = tmp_path / "sum.safetensors"
    assert main(["merge-loras", str(lora_file), str(kohya), "--weights", "0.7", "-1.5", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("merged 2 files into 137 modules (rank ")
    _, first = read_lora_file(lora_file)
    _, second = read_lora_file(attn_lora_file)
    fmt, merged = read_lora_file(out)
    assert fmt == "diffusers" and merged.modules.keys() == first.modules.keys() | second.modules.keys()
    for path, module in merged.modules.items():
        expected = sum(w * dense(f.modules[path]) for f, w in ((first, 0.7), (second, -1.5)) if path in f.modules)
        assert rel(dense(module), expected) < 1e-6, path
    assert merged.metadata["ss_training_comment"] == f"convlora merge-loras 0.7 x {lora_file} + -1.5 x {kohya}"

    small = tmp_path / "sum_r3.peft"
    assert main(["merge-loras", str(lora_file), str(attn_lora_file), "--weights", "1", "1", str(small), "--rank", "3",
                 "--format", "native"]) == 0  # fmt: skip
    fmt, resized = read_lora_file(small)
    assert fmt == "native"
    path = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    expected = dense(first.modules[path]) + dense(second.modules[path])
    assert resized.modules[path].r == 3 and rel(dense(resized.modules[path]), best_rank(expected, 3)) < 1e-4


def test_merge_loras_zero_weight_and_shape_conflicts(lora_file, attn_lora_file, tmp_path, capsys):
    out = tmp_path / "only_first.safetensors"
    assert main(["merge-loras", str(lora_file), str(attn_lora_file), "--weights", "1", "0", str(out)]) == 0
    _, first = read_lora_file(lora_file)
    _, merged = read_lora_file(out)
    assert merged.modules.keys() == first.modules.keys()
    assert all(torch.equal(merged.modules[p].lora_B, m.lora_B) for p, m in first.modules.items())

    _, weights = read_lora_file(attn_lora_file)
    path = next(iter(weights.modules))
    module = weights.modules[path]
    bad = LoRAWeights({path: type(module)(module.lora_A[:, :-1], module.lora_B, module.alpha)}, metadata={})
    write_lora_file(bad, tmp_path / "bad.safetensors", "diffusers")
    out = tmp_path / "never.safetensors"
    assert main(["merge-loras", str(attn_lora_file), str(tmp_path / "bad.safetensors"), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"convlora merge-loras: error: {path}: {attn_lora_file} has lora_A (6, {module.lora_A.shape[1]})" in err
    assert "not the same layer" in err and not out.exists()


# ---- one-line errors, and no OUT after a failure ---------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["resize", "{missing}", "{out}", "--rank", "2"], "LoRA file not found: {missing}"),
        (["resize", "{lora}", "{out}", "--rank", "0"], "--rank must be an integer >= 1, got 0"),
        (["resize", "{lora}", "{out}", "--rank", "2", "--conv-rank", "-1"], "--conv-rank must be an integer >= 1, got -1"),
        (["resize", "{lora}", "{out}", "--rank", "2", "--dynamic", "sv_max", "--dynamic_param", "0.5"],
         "unknown dynamic method 'sv_max': choose one of sv_ratio, sv_fro, sv_cumulative"),
        (["resize", "{lora}", "{lora}", "--rank", "2"], "OUT {lora} exists; pass --overwrite to replace it"),
        (["extract", "{missing}", "{missing}", "{out}", "--rank", "2"], "model folder not found: {missing}"),
        (["extract", "{pipe}", "{pipe}", "{out}", "--rank", "0"], "--rank must be an integer >= 1, got 0"),
        (["extract", "{pipe}", "{pipe}", "{lora}", "--rank", "2"], "OUT {lora} exists; pass --overwrite to replace it"),
        (["merge-loras", "{lora}", "{lora}", "--weights", "1", "2", "3", "{out}"],
         "--weights has 3 value(s) for 2 file(s); give one weight per file"),
        (["merge-loras", "{lora}", "{missing}", "{out}"], "LoRA file not found: {missing}"),
        (["merge-loras", "{lora}", "{out}", "--rank", "0"], "--rank must be an integer >= 1, got 0"),
        (["merge-loras", "{lora}", "{lora}", "{lora}"], "OUT {lora} exists; pass --overwrite to replace it"),
        (["merge-loras", "{lora}"], "merge-loras needs at least one LoRA file and OUT"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_leaves_no_out(argv, message, lora_file, pipeline_dir, tmp_path, capsys):
    names = {"missing": str(tmp_path / "missing.safetensors"), "out": str(tmp_path / "out.safetensors"),
             "lora": str(lora_file), "pipe": str(pipeline_dir)}  # fmt: skip
    before = lora_file.stat().st_mtime_ns
    assert main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err == f"convlora {argv[0]}: error: {message.format(**names)}\n"
    assert not (tmp_path / "out.safetensors").exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    assert lora_file.stat().st_mtime_ns == before


def test_overwrite_replaces_out_in_place(lora_file, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    out.write_bytes(b"old")
    assert main(["resize", str(lora_file), str(out), "--rank", "2", "--overwrite"]) == 0
    assert read_lora_file(out)[1].most_common()[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]  # no temporary left


def test_extract_refuses_a_pipeline_against_a_single_model(pipeline_dir, merged_dir, tmp_path, capsys):
    assert main(["extract", str(pipeline_dir), str(merged_dir / "unet"), str(tmp_path / "x.safetensors"), "--rank", "2"]) == 2
    assert capsys.readouterr().err == (
        "convlora extract: error: BASE has components ['text_encoder', 'unet'], TUNED [] (a single model)\n"
    )
