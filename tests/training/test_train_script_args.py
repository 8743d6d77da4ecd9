"""The training script's arguments and grid, without training (fast): the script is imported, not run."""

from __future__ import annotations

import pytest
from PIL import Image


def test_no_arguments_means_the_embedded_default(script):
    args = script.parse_args([])
    assert args.embedded and args.pretrained_model_name_or_path is None  # filled in by setup()
    assert (args.resolution, args.rank, args.unet_preset, args.seed) == (32, 8, "full", 0)
    assert args.validation_prompt == script.EMBEDDED_PROMPTS and args.save_format == ["diffusers", "kohya"]
    assert args.output_dir == "out/sks-bag-lora"


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
