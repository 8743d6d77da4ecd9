"""The training script's arguments and grid, without training (fast): the script is imported, not run."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from train_script_helpers import REPO


def test_no_arguments_means_the_embedded_default(script):
    args = script.parse_args([])
    assert args.embedded and args.pretrained_model_name_or_path is None  # filled in by setup()
    assert (args.resolution, args.rank, args.unet_preset, args.seed) == (32, 43, "attn", 0)
    assert args.validation_prompt == script.EMBEDDED_PROMPTS and args.save_format == ["diffusers", "kohya"]
    assert args.output_dir == "out/sks-bag-lora"
    assert args.cache_latents and args.cache_text_embeddings


@pytest.mark.parametrize(
    "argv, latents, text",
    [
        (["--no-center_crop"], False, True),  # a random crop would change a cached latent
        (["--train_text_encoder"], True, False),  # a trained encoder's outputs change every step
        (["--no-cache_latents", "--no-cache_text_embeddings"], False, False),
        (["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"], False, False),
        (["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--cache_latents", "--cache_text_embeddings"], True, True),
    ],
)
def test_the_embedded_run_caches_what_its_frozen_parts_compute(script, argv, latents, text):
    args = script.parse_args(argv)
    assert (args.cache_latents, args.cache_text_embeddings) == (latents, text)


def test_the_embedded_run_with_a_trained_text_encoder_preserves_against_the_noise(script):
    # the base's predictions would come from the base encoder's embeddings, which training changes
    assert script.parse_args([]).prior_target == "base"
    assert script.parse_args(["--train_text_encoder"]).prior_target == "noise"


def test_own_model_gets_the_diffusers_defaults(script):
    args = script.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--rank", "16"])
    assert not args.embedded and args.validation_prompt is None and args.seed is None
    assert (args.resolution, args.train_batch_size, args.learning_rate, args.lr_scheduler, args.lr_warmup_steps) == (512, 16, 1e-4, "constant", 500)
    assert args.rank == 16 and args.unet_preset == "full"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pretrained_model_name_or_path", "m"], "give the data too"),
        (["--validation_prompt", "a", "b", "--validation_score_classes", "bag"], "one class"),
        (["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
        (["--unet_preset", "everything"], "invalid choice"),
        (["--validation_batch_size", "0"], "--validation_batch_size must be >= 1"),
    ],
)
def test_argument_errors(script, capsys, argv, message):
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    assert message in capsys.readouterr().err


def test_grid_layout(script):
    rows = [[Image.new("RGB", (32, 32), (i, 0, 0)) for i in range(10)] for _ in range(2)]
    grid = script.make_grid(rows, rows, ["p", "q"], step=7)
    # 10 images per side wrap to 2 lines of 8; 96 px tiles; 220 px labels, 16 px gap, 22 px header, 8 px between prompts
    assert grid.size == (220 + 2 * 8 * 96 + 16, 22 + 2 * (2 * 96 + 8) - 8)
    assert grid.getpixel((220 + 8 * 96 + 16 + 96 + 5, 22 + 96 + 5)) == (9, 0, 0)  # LoRA side, image 9 = line 2, column 2


def test_the_embedded_run_preserves_the_nine_known_classes(script):
    args = script.parse_args([])
    assert args.validation_score_classes == ["bag", "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                                             "sneaker", "ankle boot"]
    assert args.validation_prompt[0] == "a photo of a sks bag" and args.validation_prompt[9] == "a photo of a ankle boot"
    assert args.with_prior_preservation and args.reg_data_dir is None and args.class_prompt == script.EMBEDDED_CLASS_PROMPTS
    assert script.prior_settings(args) == {
        "--with_prior_preservation": True, "--prior_loss_weight": 1.0, "--prior_target": "base",
        "--class_prompt": script.EMBEDDED_CLASS_PROMPTS, "--num_class_images": 32, "--class_inference_steps": 50,
        "--class_guidance_scale": 4.0, "--class_seed": 0}
    assert script.run_settings(args) == {**script.adapter_settings(args), **script.prior_settings(args)}
    real = script.parse_args(["--reg_data_dir", str(script.EMBEDDED_REG)])  # real images, kohya folders
    assert real.class_prompt is None and script.prior_settings(real) == {
        "--with_prior_preservation": True, "--prior_loss_weight": 1.0, "--prior_target": "base",
        "--reg_data_dir": str(script.EMBEDDED_REG)}
    own = script.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--with_prior_preservation",
                             "--class_prompt", "a dog", "--class_data_dir", "c"])
    assert own.prior_target == "noise"  # DreamBooth's class loss, unless asked
    assert script.prior_settings(script.parse_args(["--no-with_prior_preservation"])) == {}


def _embedded_class_dir(script, tmp_path, argv: list[str]) -> str:
    args = script.parse_args(["--output_dir", str(tmp_path / "out"), *argv])
    script.prepare_embedded_default(args, is_main=False)
    return args.class_data_dir


@pytest.mark.skipif(not (REPO / "examples" / "fashion-prior" / "class_images.json").is_file(), reason="no shipped class images")
def test_the_embedded_run_reads_the_shipped_class_images_only_when_they_are_its_own(script, tmp_path):
    assert _embedded_class_dir(script, tmp_path, []) == str(script.EMBEDDED_PRIOR)
    assert _embedded_class_dir(script, tmp_path, ["--num_class_images", "16"]) == str(script.EMBEDDED_PRIOR)
    made_here = str(tmp_path / "out" / "class_images")  # other settings: made (and cached) in the output folder
    for argv in (["--num_class_images", "33"], ["--class_guidance_scale", "2"], ["--class_seed", "1"],
                 ["--class_inference_steps", "20"], ["--class_prompt", "a photo of a coat"]):
        assert _embedded_class_dir(script, tmp_path, argv) == made_here, argv
    assert _embedded_class_dir(script, tmp_path, ["--class_data_dir", "c"]) == "c"


@pytest.mark.parametrize("argv, message", [
    (["--with_prior_preservation", "--enable_bucket", "--min_bucket_reso", "16", "--bucket_reso_steps", "8"],
     "--with_prior_preservation does not work with --enable_bucket yet"),
    (["--no-with_prior_preservation", "--reg_data_dir", "r"], "--reg_data_dir is for prior preservation"),
    (["--prior_loss_weight", "-1"], "--prior_loss_weight must be >= 0, got -1.0"),
    (["--num_class_images", "0"], "--num_class_images must be >= 1, got 0"),
])
def test_prior_argument_errors(script, capsys, argv, message):
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    assert message in capsys.readouterr().err


# ---- adapter kinds: --adapter, --lokr_factor, --lokr_decompose_both, --dora_wd ---------------------


def test_the_default_adapter_is_plain_lora_with_its_formats_and_settings(script):
    args = script.parse_args([])
    assert (args.adapter, args.lokr_factor, args.lokr_decompose_both, args.dora_wd) == ("lora", None, False, False)
    assert script.adapter_kind_fields(args) == {} and script.kind_settings(args) == {}
    assert script.run_settings(args) == {
        "--unet_preset": "attn", "--rank": 43, "--lora_alpha": 43.0, "--train_text_encoder": False,
        **script.prior_settings(args)}


@pytest.mark.parametrize(
    "argv, fields, settings, formats",
    [
        (["--adapter", "dora"], {"kind": "dora"}, {"--adapter": "dora"}, ["diffusers", "kohya"]),
        (["--adapter", "loha", "--dora_wd"], {"kind": "loha", "weight_decompose": True},
         {"--adapter": "loha", "--dora_wd": True}, ["kohya"]),
        (["--adapter", "lokr", "--lokr_factor", "2", "--lokr_decompose_both", "--save_format", "native"],
         {"kind": "lokr", "factor": 2, "decompose_both": True},
         {"--adapter": "lokr", "--lokr_factor": 2, "--lokr_decompose_both": True}, ["native"]),
        (["--adapter", "lokr", "--lokr_factor", "-1"], {"kind": "lokr", "factor": -1}, {"--adapter": "lokr"}, ["kohya"]),
    ],
)
def test_kind_flags_give_the_config_fields_the_checkpoint_settings_and_file_formats(script, argv, fields, settings, formats):
    args = script.parse_args(argv)
    assert script.adapter_kind_fields(args) == fields and script.kind_settings(args) == settings
    assert args.save_format == formats
    recorded = script.run_settings(args)
    assert {k: v for k, v in recorded.items() if k in script.KIND_SETTING_DEFAULTS} == settings
    assert recorded["--rank"] == 43  # the rest as for LoRA


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lokr_factor", "4"], "--lokr_factor is a LoKr option; it needs --adapter lokr, not --adapter lora"),
        (["--adapter", "loha", "--lokr_decompose_both"],
         "--lokr_decompose_both is a LoKr option; it needs --adapter lokr, not --adapter loha"),
        (["--adapter", "lokr", "--lokr_factor", "0"], "--lokr_factor must be -1 (the most balanced split) or >= 1, got 0"),
        (["--dora_wd"], "--dora_wd adds weight decomposition to --adapter loha / lokr; --adapter lora has none: "
                        "for LoRA with DoRA use --adapter dora"),
        (["--adapter", "dora", "--dora_wd"], "--dora_wd adds weight decomposition to --adapter loha / lokr; "
                                             "--adapter dora already has it"),
        (["--adapter", "lokr", "--save_format", "native", "diffusers"],
         "--save_format diffusers: diffusers files do not carry the lokr adapter kind (--adapter lokr); "
         "save it as --save_format native, kohya"),
        (["--adapter", "loha", "--dora_wd", "--save_format", "diffusers"],
         "--save_format diffusers: diffusers files do not carry the loha+dora adapter kind (--adapter loha --dora_wd); "
         "save it as --save_format native, kohya"),
        (["--adapter", "boft"], "argument --adapter: invalid choice: 'boft' (choose from 'lora', 'dora', 'loha', 'lokr')"),
    ],
)
def test_kind_argument_errors_are_one_named_line_before_any_work(script, capsys, tmp_path, argv, message):
    from train_script_helpers import command_line_error

    out = tmp_path / "never"
    line = command_line_error(script, capsys, ["--output_dir", str(out), *argv], code=2)
    assert line.split(": error: ", 1)[1] == f"{message} (see --help)"
    assert not out.exists()  # refused while reading the arguments: nothing was made


def test_a_checkpoint_of_one_kind_refuses_a_resume_with_another_kind_or_factor(script, tmp_path):
    from convlora.training.checkpoints import CheckpointError, check_settings, save_checkpoint, write_state

    def checkpoint_of(argv: list[str], step: int):
        settings = script.run_settings(script.parse_args(argv))
        return save_checkpoint(tmp_path, step, lambda folder: write_state(folder, "progress", {"global_step": step}),
                               info={"settings": settings})

    def refusal(path, argv: list[str]) -> str:
        with pytest.raises(CheckpointError) as err:
            check_settings(path, script.run_settings(script.parse_args(argv)), defaults=script.KIND_SETTING_DEFAULTS)
        return str(err.value).split(": ", 1)[1].split(". Resume", 1)[0]

    lokr = checkpoint_of(["--adapter", "lokr", "--lokr_factor", "2"], 2)
    check_settings(lokr, script.run_settings(script.parse_args(["--adapter", "lokr", "--lokr_factor", "2"])),
                   defaults=script.KIND_SETTING_DEFAULTS)
    assert refusal(lokr, ["--adapter", "lokr"]) == "--lokr_factor 2 (checkpoint) vs -1 (this run)"
    assert refusal(lokr, []) == "--adapter 'lokr' (checkpoint) vs 'lora' (this run); --lokr_factor 2 (checkpoint) vs -1 (this run)"
    lora = checkpoint_of([], 4)  # a plain LoRA checkpoint records no kind flag, as before kinds existed
    assert "--adapter" not in json.loads((lora / "checkpoint.json").read_text())["settings"]
    assert refusal(lora, ["--adapter", "dora"]) == "--adapter 'lora' (checkpoint) vs 'dora' (this run)"


def test_validation_prompts_batched_together_give_each_prompt_its_own_seeded_images(script, tiny_base):
    import argparse

    import numpy as np
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    args = argparse.Namespace(validation_prompt=["a photo of a coat", "a photo of a sks bag", "a photo of a shirt"],
                              num_validation_images=2, seed=5, resolution=32, validation_inference_steps=2,
                              validation_guidance_scale=4.0, validation_batch_size=None)
    one_by_one = script.sample_images(pipe, args)
    args.validation_batch_size = 5  # two prompts (4 images) per call, then one
    batched = script.sample_images(pipe, args)
    assert [len(row) for row in batched] == [2, 2, 2]
    for row_a, row_b in zip(one_by_one, batched):
        for a, b in zip(row_a, row_b):
            assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1
    assert np.asarray(batched[0][0]).tobytes() != np.asarray(batched[0][1]).tobytes()  # seed + i: not one image twice
