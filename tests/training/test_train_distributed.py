"""End-to-end, beyond one process: DDP, FSDP2 and two machines each give the LoRA of one process at
the combined batch, and resume exactly (with dataloader workers, too). Real `accelerate launch` runs of the training script on the tiny
pipeline (gloo on the CPU); one 1-process reference run serves every comparison."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from train_script_helpers import REPO, check_ok, free_port, launch, script_args, summary

from convlora import read_safetensors
from convlora.training.checkpoints import list_checkpoints

pytestmark = pytest.mark.slow

# Adam turns a gradient into about +-lr per element, so float summation-order differences in the
# weights scale with the learning rate: 5e-5 keeps them near 1e-6. Latents are cached (each process
# encodes the whole set once) so that caching under N processes is checked too.
COMMON = dict(max_train_steps=4, learning_rate=5e-5, lr_scheduler="cosine", lr_warmup_steps=1, checkpointing_steps=2,
              cache_latents=True, center_crop=True)
WEIGHT_TOLERANCE = 1e-5


# The tests that use it run on one pytest-xdist worker, so that it is trained once.
SHARES_REFERENCE = pytest.mark.xdist_group("distributed-reference")


@pytest.fixture(scope="module")
def reference(tiny_base, toy_data, tmp_path_factory) -> Path:
    """One process at batch 2: what every 2-process run at batch 1 must equal (tests using it: SHARES_REFERENCE)."""
    out = tmp_path_factory.mktemp("reference") / "one"
    check_ok(launch(script_args(tiny_base, toy_data, out, train_batch_size=2, **COMMON)))
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:6]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _assert_equals_reference(run: Path, reference: Path) -> float:
    """Same keys, weights within WEIGHT_TOLERANCE, same losses and schedule; returns the max weight difference."""
    diff = _max_diff(_tensors(run / "lora_convlora.safetensors"), _tensors(reference / "lora_convlora.safetensors"))
    assert diff < WEIGHT_TOLERANCE, diff
    s, r = summary(run), summary(reference)
    assert np.allclose(s["losses"], r["losses"], atol=1e-6, rtol=0), (s["losses"], r["losses"])
    assert s["learning_rates"] == r["learning_rates"]
    return diff


def _assert_bit_equal(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        ta, tb = _tensors(a / name), _tensors(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert summary(a)["losses"] == summary(b)["losses"]


def _fsdp_cpu_config(tmp_path: Path) -> Path:
    """The shipped FSDP config, on CPU processes."""
    config = tmp_path / "fsdp_cpu.yaml"
    config.write_text((REPO / "accelerate_config_fsdp.yaml").read_text().replace("use_cpu: false", "use_cpu: true"))
    return config


# ---- DDP ------------------------------------------------------------------------------------------


def test_two_process_ddp_with_prior_preservation_against_the_base_equals_one_process_double_batch(tiny_base, toy_data, tmp_path):
    # DDP over gloo (the schedule does not depend on the process count either). Each process trains its own instance and class samples
    # (the class targets are the frozen base's predictions, made inside the DDP wrapper); both runs generate their class images
    # (the 2-process run on its main process while the other waits), which must come out the same.
    prior = dict(with_prior_preservation=True, class_prompt=["a photo of a coat", "a photo of a shirt"], num_class_images=3,
                 class_inference_steps=2, sample_batch_size=4, prior_loss_weight=0.5, prior_target="base")
    one, two = tmp_path / "one", tmp_path / "two"
    check_ok(launch(script_args(tiny_base, toy_data, one, train_batch_size=2, class_data_dir=one / "class", **COMMON, **prior)))
    output = check_ok(launch(script_args(tiny_base, toy_data, two, train_batch_size=1, class_data_dir=two / "class",
                                         **COMMON, **prior), num_processes=2))
    assert "distributed type: MULTI_CPU (DDP" in output and "[RANK 1]" in output
    assert output.count("Done in") == 1  # one save, by the main process
    assert summary(two)["num_processes"] == 2 and summary(one)["num_processes"] == 1
    assert summary(two)["distributed"] == {"requested": "DATA_PARALLEL", "running": "MULTI_CPU", "sharded": False,
                                           "frozen_local_share": 1.0}
    assert [p.name for _, p in list_checkpoints(two)] == ["checkpoint-2", "checkpoint-4"]
    assert output.count("Generating class images") >= 1 and "8 images + 6 class images (prior preservation)" in output
    images = sorted(p.name for p in (one / "class").glob("*.png"))
    assert images == [f"p{k:02d}-{i:05d}.png" for k in range(2) for i in range(3)]
    assert all((one / "class" / name).read_bytes() == (two / "class" / name).read_bytes() for name in images)
    diff = _assert_equals_reference(two, one)
    assert summary(two)["prior_preservation"] == {**{f"--{k}": v for k, v in prior.items() if k != "sample_batch_size"},
                                                  "--class_guidance_scale": 7.5, "--class_seed": 0, "class_data_dir": str(two / "class"),
                                                  "num_class_images_used": 6}
    print(f"DDP vs 1 process with prior preservation: LoRA {diff:.2e}")


# ---- FSDP2 ---------------------------------------------------------------------------------------


@SHARES_REFERENCE
def test_fsdp2_two_processes_equal_one_process_and_resume_exactly(tiny_base, toy_data, tmp_path, reference):
    config = _fsdp_cpu_config(tmp_path)
    straight, resumed = tmp_path / "fsdp", tmp_path / "fsdp-resumed"
    two = ["--num_processes", "2"]  # the config's own distributed_type (FSDP) and process count
    output = check_ok(launch(script_args(tiny_base, toy_data, straight, train_batch_size=1, **COMMON), config=config,
                             launcher_args=two))

    # what runs is said, and it is FSDP: each process holds about half of the frozen base
    assert "distributed type: FSDP2 (torch fully_shard over gloo, applied by the script" in output
    s = summary(straight)
    assert s["num_processes"] == 2 and s["distributed"]["requested"] == "FSDP2" and s["distributed"]["sharded"]
    assert 0.45 < s["distributed"]["frozen_local_share"] < 0.6, s["distributed"]
    assert s["dtypes"]["unet"]["trainable"] == ["torch.float32"]

    # the LoRA equals one process at double batch; the files have the reference's (plain) keys, written once
    diff = _assert_equals_reference(straight, reference)
    assert not [k for k in _tensors(straight / "lora_convlora.safetensors") if "_fsdp" in k or k.startswith("module.")]
    assert output.count("Done in") == 1
    ckpt_diff = _max_diff(_tensors(straight / "checkpoint-2" / "unet_lora.safetensors"),
                          _tensors(reference / "checkpoint-2" / "unet_lora.safetensors"))
    assert ckpt_diff < WEIGHT_TOLERANCE
    optimizer_diff = _max_diff(_tensors(straight / "checkpoint-4" / "optimizer.safetensors"),
                               _tensors(reference / "checkpoint-4" / "optimizer.safetensors"))
    assert optimizer_diff < 1e-6  # whole Adam moments, not one process's shard
    print(f"FSDP2 vs 1 process: LoRA {diff:.2e}, checkpoint-2 {ckpt_diff:.2e}, optimizer state {optimizer_diff:.2e}")

    # a checkpoint written under FSDP resumes under FSDP to the same bits as the straight run, here with
    # 2 dataloader workers per process: every draw is seeded by sample, so workers change nothing
    output = check_ok(launch(script_args(tiny_base, toy_data, resumed, train_batch_size=1, dataloader_num_workers=2,
                                         resume_from_checkpoint=straight / "checkpoint-2", **COMMON), config=config,
                             launcher_args=two))
    assert "checkpoint-2 at step 2" in output
    _assert_bit_equal(straight, resumed, ["lora_convlora.safetensors", "checkpoint-4/unet_lora.safetensors",
                                          "checkpoint-4/optimizer.safetensors"])


# ---- two machines ----------------------------------------------------------------------------------


def _two_machines(tiny_base, toy_data, out: Path, log_dir: Path, **overrides) -> list[str]:
    """Two `accelerate launch` "machines" on localhost, one process each (as on two real nodes)."""
    port, procs = free_port(), []
    args = script_args(tiny_base, toy_data, out, train_batch_size=1, **{**COMMON, **overrides})
    for rank in (0, 1):
        procs.append(launch(args, env={"ACCELERATE_USE_CPU": "1"}, wait=False, log=log_dir / f"machine-{rank}.log",
                            launcher_args=["--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
                                           "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                                           "--main_process_port", str(port)]))
    outputs = []
    for rank, proc in enumerate(procs):
        try:
            returncode = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        text = (log_dir / f"machine-{rank}.log").read_text()
        assert returncode == 0, text[-4000:]
        outputs.append(text)
    return outputs


@SHARES_REFERENCE
def test_two_machines_equal_one_process_rotate_and_resume(tiny_base, toy_data, tmp_path, reference):
    straight, resumed = tmp_path / "two-machines", tmp_path / "two-machines-resumed"
    rotation = dict(checkpointing_steps=1, checkpoints_total_limit=2)
    main, other = _two_machines(tiny_base, toy_data, straight, tmp_path, **rotation)
    assert "distributed type: MULTI_CPU (DDP" in main and "Done in" in main and "Done in" not in other
    assert summary(straight)["num_processes"] == 2
    diff = _assert_equals_reference(straight, reference)
    # every step saved, the main process alone rotated: the two newest are left, no partial folders
    assert [p.name for _, p in list_checkpoints(straight)] == ["checkpoint-3", "checkpoint-4"]
    assert sorted(p.name for p in straight.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))) == \
        ["checkpoint-3", "checkpoint-4"]
    print(f"2 machines vs 1 process: LoRA {diff:.2e}")

    # resume the 2-machine run from its checkpoint-3, again on two machines: the same bits
    (tmp_path / "resume-logs").mkdir()
    main, _ = _two_machines(tiny_base, toy_data, resumed, tmp_path / "resume-logs",
                            resume_from_checkpoint=straight / "checkpoint-3", **rotation)
    assert "checkpoint-3 at step 3" in main
    _assert_bit_equal(straight, resumed, ["lora_convlora.safetensors", "checkpoint-4/unet_lora.safetensors",
                                          "checkpoint-4/optimizer.safetensors"])
