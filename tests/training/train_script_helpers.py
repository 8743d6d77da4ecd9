"""Run the real training script through ``accelerate launch`` (used by the end-to-end tests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "train_scripts" / "train_text_to_image_lora.py"
CONFIG = REPO / "accelerate_config.yaml"
FAULTS = Path(__file__).resolve().parent / "run_with_faults.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"


def script_args(base: Path, data: Path, out: Path, **overrides) -> list[str]:
    """Arguments for a quick run on the tiny base: 32x32, fp32, no tensorboard unless asked."""
    options = {
        "pretrained_model_name_or_path": base,
        "train_data_dir": data,
        "output_dir": out,
        "resolution": 32,
        "train_batch_size": 2,
        "max_train_steps": 4,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "checkpointing_steps": 1000,
        "seed": 0,
        "save_format": "native",
        "report_to": "none",
    }
    options.update(overrides)
    args = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        args.append(f"--{key}")
        if value is True:
            continue
        args += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return args


def launch(args: list[str], num_processes: int = 1, config: Path = CONFIG, faults: dict | None = None,
           timeout: float = 600, env: dict | None = None, new_session: bool = False, wait: bool = True,
           log: Path | None = None, launcher_args: list[str] | None = None):
    """Run the training script with ``accelerate launch`` (``--multi_gpu --num_processes N`` for N > 1).

    ``faults`` runs it through ``run_with_faults.py``, which patches one library function
    (see that file) before executing the unchanged script. ``launcher_args`` replace the
    process-count flags (e.g. the multi-machine ones); ``num_processes`` is then ignored.
    Unless ``launcher_args`` name one, each launch gets its own free ``--main_process_port``:
    accelerate's default (29500) would collide between tests running at the same time.
    """
    cmd = [str(ACCELERATE), "launch", "--config_file", str(config)]
    if launcher_args is not None:
        cmd += launcher_args
    elif num_processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(num_processes)]
    else:
        cmd += ["--num_processes", "1"]
    if "--main_process_port" not in cmd:
        cmd += ["--main_process_port", str(free_port())]
    if faults:
        cmd += [str(FAULTS), json.dumps(faults), str(SCRIPT)]
    else:
        cmd += [str(SCRIPT)]
    cmd += args
    # accelerate launch gives each process one OpenMP thread unless OMP_NUM_THREADS says otherwise;
    # for these tiny models on shared cores that is also the fastest (more threads only spin).
    full_env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "PYTHONUNBUFFERED": "1", **(env or {})}
    if not wait:  # output goes to `log` (a pipe nobody reads could fill up and block the run)
        with open(log, "w") as fh:
            return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=new_session)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port nobody listens on right now (for a launcher's --main_process_port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command_line_error(script, capsys, argv: list[str], code: int = 1) -> str:
    """Run the script's command line in this process (``script``: the imported script module, ``capsys``:
    pytest's fixture); assert exit code ``code`` and no traceback; return its one error line."""
    try:
        rc = script.command_line([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == code, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(errors) == 1, err[-2000:]
    return errors[0]


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def check_ok(result) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def load_pipeline(base: Path):
    """The saved tiny SD pipeline, as the tests load it (no safety checker, no progress bar)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_out(unet):
    """The UNet's output on fixed random inputs ((2, 4, 8, 8) latents, timesteps 20 and 600, (2, 77, 32) text)."""
    import torch

    gen = torch.Generator().manual_seed(123)
    x, h = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([20, 600]), h).sample
