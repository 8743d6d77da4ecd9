"""Run the unchanged training script with one library function patched, to provoke a fault on cue.

    accelerate launch run_with_faults.py '<json faults>' train_scripts/train_text_to_image_lora.py [args]

Faults (JSON object):
    {"hang_in_checkpoint": {"step": 6, "ready_file": "/tmp/x"}}
        While saving checkpoint-<step>, after its files are written into the temporary folder but
        before it is marked complete and renamed, touch ``ready_file`` and sleep, so the test can
        SIGKILL the run "while saving".
    {"nan_loss_at_steps": [3, 4, 5]}
        ``diffusion_loss`` returns NaN for the batches of those optimizer steps (1-based; one batch
        per step, i.e. gradient_accumulation_steps 1).

The patches replace attributes of ``convlora.training.*`` modules before the script imports them, so
the script runs exactly as shipped otherwise.
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

import torch

import convlora.training.checkpoints as checkpoints
import convlora.training.noise as noise


def main() -> None:
    faults = json.loads(sys.argv[1])
    script = sys.argv[2]
    if "hang_in_checkpoint" in faults:
        spec = faults["hang_in_checkpoint"]
        original_save = checkpoints.save_checkpoint

        def save_checkpoint(output_dir, step, write, *args, **kwargs):
            if step != spec["step"]:
                return original_save(output_dir, step, write, *args, **kwargs)

            def write_then_hang(folder: Path) -> None:
                write(folder)
                Path(spec["ready_file"]).write_text(str(folder))
                time.sleep(3600)

            return original_save(output_dir, step, write_then_hang, *args, **kwargs)

        checkpoints.save_checkpoint = save_checkpoint
    if "nan_loss_at_steps" in faults:
        bad_steps = set(faults["nan_loss_at_steps"])
        original_loss = noise.diffusion_loss
        calls = {"n": 0}

        def diffusion_loss(*args, **kwargs):
            calls["n"] += 1
            loss = original_loss(*args, **kwargs)
            return loss * torch.nan if calls["n"] in bad_steps else loss

        noise.diffusion_loss = diffusion_loss
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
