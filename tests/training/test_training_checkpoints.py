"""convlora.training.checkpoints: atomic saves, numeric rotation, resume resolution, pickle-free state."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from convlora import read_safetensors
from convlora.training.checkpoints import (
    MARKER,
    CheckpointError,
    check_settings,
    incomplete_checkpoints,
    list_checkpoints,
    read_marker,
    read_state,
    remove_interrupted_saves,
    resolve_resume_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    write_json,
    write_state,
)


def _writer(value: int):
    def write(folder):
        (folder / "data.json").write_text(json.dumps({"value": value}))

    return write


def test_save_is_complete_and_numbered(tmp_path):
    path = save_checkpoint(tmp_path, 7, _writer(7), info={"note": "x"})
    assert path == tmp_path / "checkpoint-7"
    assert json.loads((path / "data.json").read_text()) == {"value": 7}
    marker = read_marker(path)
    assert marker["step"] == 7 and marker["files"] == ["data.json"] and marker["note"] == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-7"]  # no temporary leftovers


def test_a_failing_write_leaves_nothing_and_keeps_the_previous(tmp_path):
    save_checkpoint(tmp_path, 1, _writer(1))

    def broken(folder):
        (folder / "half.bin").write_bytes(b"12")
        raise OSError("disk full")

    with pytest.raises(CheckpointError, match="cannot write checkpoint-2 in .*: disk full; the earlier checkpoints are untouched"):
        save_checkpoint(tmp_path, 2, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert resolve_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-1"


def test_rotation_is_numeric_and_happens_after_the_new_one_is_complete(tmp_path):
    for step in (8, 9):
        save_checkpoint(tmp_path, step, _writer(step), total_limit=2)

    def write_10(folder):
        # While checkpoint-10 is being written, both older ones are still there.
        assert [s for s, _ in list_checkpoints(tmp_path)] == [8, 9]
        _writer(10)(folder)

    save_checkpoint(tmp_path, 10, write_10, total_limit=2)
    # Lexical order would call checkpoint-10 the oldest; by step number it is the newest.
    assert [s for s, _ in list_checkpoints(tmp_path)] == [9, 10]
    save_checkpoint(tmp_path, 100, _writer(100), total_limit=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [100]


def test_latest_ignores_partial_saves(tmp_path):
    save_checkpoint(tmp_path, 4, _writer(4))
    (tmp_path / ".checkpoint-6.tmp-abc123").mkdir()  # an interrupted save
    (tmp_path / ".checkpoint-6.tmp-abc123" / "optimizer.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / "checkpoint-5").mkdir()  # copied by hand, never finished: no marker
    with pytest.warns(UserWarning, match=r"ignoring incomplete checkpoint.*\.checkpoint-6\.tmp-abc123.*checkpoint-5"):
        assert resolve_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-4"
    assert [p.name for p in incomplete_checkpoints(tmp_path)] == [".checkpoint-6.tmp-abc123", "checkpoint-5"]
    with pytest.raises(CheckpointError, match=r"checkpoint-5 is incomplete \(no checkpoint.json\)"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-5"), tmp_path)
    # The leftover of the interrupted save goes away once a newer checkpoint is complete.
    save_checkpoint(tmp_path, 8, _writer(8), total_limit=5)
    assert not (tmp_path / ".checkpoint-6.tmp-abc123").exists()


def test_resume_paths(tmp_path):
    assert resolve_resume_checkpoint("latest", tmp_path / "nothing-yet") is None
    save_checkpoint(tmp_path, 3, _writer(3))
    assert resolve_resume_checkpoint("checkpoint-3", tmp_path) == tmp_path / "checkpoint-3"  # bare name, as diffusers
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-3"), "/elsewhere") == tmp_path / "checkpoint-3"
    with pytest.raises(CheckpointError, match=r"'checkpoint-4': no such checkpoint folder \(looked in"):
        resolve_resume_checkpoint("checkpoint-4", tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path / "missing" / "checkpoint-1"), tmp_path)


def test_same_step_saved_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 2, _writer(1))
    save_checkpoint(tmp_path, 2, _writer(2))
    assert json.loads((tmp_path / "checkpoint-2" / "data.json").read_text()) == {"value": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_checkpoint_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path, 1, _writer(1))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / MARKER).stat().st_mode) == 0o644


# ---- pickle-free state --------------------------------------------------------------------------


def _train(params, optimizer, scheduler, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
        scheduler.step()


def _make(seed=0, optimizer="adamw"):
    """Two parameter groups; for bitsandbytes' AdamW8bit the (64, 80) and (4096,) tensors (>= its
    4096-element minimum) get 8-bit blockwise state (sharing one quantization map), the small ones
    32-bit state."""
    from diffusers.optimization import get_scheduler

    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.randn(4096))]
    groups = [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3}]
    if optimizer == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(groups, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(groups, weight_decay=0.01)
    scheduler = get_scheduler("cosine", optimizer=opt, num_warmup_steps=2, num_training_steps=10)
    return params, opt, scheduler


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_optimizer_and_scheduler_state_round_trip_exactly(tmp_path, optimizer):
    params, opt, scheduler = _make(optimizer=optimizer)
    start = [p.detach().clone() for p in params]
    _train(params, opt, scheduler, 4, seed=1)
    assert all(not torch.equal(p, q) for p, q in zip(params, start))  # real steps
    write_state(tmp_path, "optimizer", opt.state_dict())
    write_state(tmp_path, "lr_scheduler", scheduler.state_dict())
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.bin"))
    if optimizer == "adamw8bit":  # the quantized moments, their block scales and code books, as written
        stored = read_safetensors(tmp_path / "optimizer.safetensors")[0]
        dtypes = {key.rsplit(".", 1)[-1]: t.dtype for key, t in stored.items() if key.startswith("optimizer.state.0.")}
        assert dtypes == {"state1": torch.uint8, "state2": torch.uint8, "absmax1": torch.float32,
                          "absmax2": torch.float32, "qmap1": torch.float32, "qmap2": torch.float32}
        assert stored["optimizer.state.1.__bnb_optimizer_quant_state__.state1"].dtype == torch.float32  # small: 32-bit
        assert stored["optimizer.state.3.__bnb_optimizer_quant_state__.state1"].dtype == torch.uint8

    params2, opt2, scheduler2 = _make(seed=5, optimizer=optimizer)  # a fresh run, other starting values
    with torch.no_grad():
        for p, q in zip(params2, params):
            p.copy_(q)
    opt2.load_state_dict(read_state(tmp_path, "optimizer"))
    scheduler2.load_state_dict(read_state(tmp_path, "lr_scheduler"))
    _train(params, opt, scheduler, 4, seed=2)
    _train(params2, opt2, scheduler2, 4, seed=2)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()
    assert opt.param_groups[0]["betas"] == opt2.param_groups[0]["betas"] == (0.9, 0.999)


def test_grad_scaler_state_round_trip(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    write_state(tmp_path, "grad_scaler", scaler.state_dict())
    other = torch.amp.GradScaler("cpu")
    other.load_state_dict(read_state(tmp_path, "grad_scaler"))
    assert other.state_dict() == scaler.state_dict()


def test_state_structure_types_survive(tmp_path):
    state = {"a": (1, 2.5, "x", None, True), 3: [torch.arange(3)], "nested": {"t": torch.tensor(2.0)}}
    write_state(tmp_path, "s", state)
    back = read_state(tmp_path, "s")
    assert back["a"] == (1, 2.5, "x", None, True) and torch.equal(back[3][0], torch.arange(3))
    assert torch.equal(back["nested"]["t"], torch.tensor(2.0))


def test_non_finite_state_is_never_written(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        write_state(tmp_path, "bad", {"m": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match=r"state bad.lr is non-finite"):
        write_state(tmp_path, "bad", {"lr": float("inf")})
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_unpicklable_kinds_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"cannot store set at s.x without pickling"):
        write_state(tmp_path, "s", {"x": {1, 2}})


def test_rotate_without_checkpoints_is_a_no_op(tmp_path):
    assert rotate_checkpoints(tmp_path, 2) == []


# ---- damaged checkpoints, other settings, full disks, leftovers of killed saves -------------------


def _state_checkpoint(root, step=3):
    """A checkpoint like the training script's: state files (tensors + JSON) and a LoRA file."""
    def write(folder):
        write_state(folder, "optimizer", {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]})
        write_state(folder, "progress", {"global_step": step})
        (folder / "unet_lora.safetensors").write_bytes(b"x")

    return save_checkpoint(root, step, write, info={"settings": {"--rank": 4, "--lora_alpha": 4.0}})


@pytest.mark.parametrize("missing", ["optimizer.safetensors", "optimizer.json", "progress.json", "unet_lora.safetensors"])
def test_a_checkpoint_missing_a_file_it_lists_is_refused_by_name(tmp_path, missing):
    path = _state_checkpoint(tmp_path)
    (path / missing).unlink()
    for value in ("latest", str(path), "checkpoint-3"):
        with pytest.raises(CheckpointError, match=rf"checkpoint .*checkpoint-3 is missing {missing}; resume from another"):
            resolve_resume_checkpoint(value, tmp_path)


def test_required_files_are_checked_even_if_the_marker_does_not_list_them(tmp_path):
    path = _state_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"is missing lr_scheduler.json"):
        resolve_resume_checkpoint(str(path), tmp_path, required=["progress.json", "lr_scheduler.json"])
    assert resolve_resume_checkpoint(str(path), tmp_path, required=["progress.json"]) == path


def test_damaged_state_files_are_checkpoint_errors(tmp_path):
    path = _state_checkpoint(tmp_path)
    assert torch.equal(read_state(path, "optimizer")["state"][0]["exp_avg"], torch.ones(2))
    (path / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="optimizer.safetensors is not a readable safetensors file"):
        read_state(path, "optimizer")
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer.json refers to tensor 'optimizer.state.0.exp_avg'.*missing"):
        read_state(path, "optimizer")
    (path / "progress.json").write_bytes(b"{\xff")
    with pytest.raises(CheckpointError, match="progress.json is not readable JSON"):
        read_state(path, "progress")
    with pytest.raises(CheckpointError, match="lr_scheduler.json is missing"):
        read_state(path, "lr_scheduler")
    (path / MARKER).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="checkpoint.json is not a JSON object"):
        read_marker(path)


def test_settings_must_match_and_both_values_are_named(tmp_path):
    path = _state_checkpoint(tmp_path)
    check_settings(path, {"--rank": 4, "--lora_alpha": 4.0})
    with pytest.raises(CheckpointError, match=r"other settings: --lora_alpha 4.0 \(checkpoint\) vs 16.0 \(this run\)"):
        check_settings(path, {"--rank": 4, "--lora_alpha": 16.0})
    older = save_checkpoint(tmp_path, 5, _writer(5))  # records no settings: nothing to compare
    check_settings(older, {"--lora_alpha": 16.0})


def test_a_flag_recorded_only_off_its_default_reads_as_the_default_on_the_other_side(tmp_path):
    defaults = {"--adapter": "lora", "--dora_wd": False}
    path = _state_checkpoint(tmp_path)  # a plain LoRA run's checkpoint: no kind flags recorded
    check_settings(path, {"--rank": 4, "--lora_alpha": 4.0}, defaults=defaults)
    with pytest.raises(CheckpointError) as err:
        check_settings(path, {"--rank": 4, "--lora_alpha": 4.0, "--adapter": "lokr"}, defaults=defaults)
    assert str(err.value) == (f"{path} was made with other settings: --adapter 'lora' (checkpoint) vs 'lokr' (this run). "
                              "Resume with the checkpoint's values, or start a new run in another --output_dir")
    loha = save_checkpoint(tmp_path, 7, _writer(7), info={"settings": {"--rank": 4, "--adapter": "loha", "--dora_wd": True}})
    with pytest.raises(CheckpointError, match=r"settings: --adapter 'loha' \(checkpoint\) vs 'lora' \(this run\); "
                                              r"--dora_wd True \(checkpoint\) vs False \(this run\)\. Resume"):
        check_settings(loha, {"--rank": 4}, defaults=defaults)


def test_the_adapter_kind_of_each_module_must_match_on_resume(tmp_path):
    from torch import nn

    from convlora import LoRAConfig, inject_lora, save_lora
    from convlora.training.checkpoints import check_adapter_unchanged

    def model(**kind):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(8, 8, 3))
        inject_lora(net, LoRAConfig(r=2, target_modules=["0", "1"], **kind))
        return net

    save_lora(model(kind="loha", weight_decompose=True), tmp_path / "unet_lora.safetensors")
    check_adapter_unchanged(model(kind="loha", weight_decompose=True), tmp_path / "unet_lora.safetensors")
    for kind, label in (({"kind": "lokr"}, "lokr"), ({"kind": "loha"}, "loha"), ({}, "")):
        with pytest.raises(CheckpointError) as err:
            check_adapter_unchanged(model(**kind), tmp_path / "unet_lora.safetensors")
        assert str(err.value) == (
            f"{tmp_path / 'unet_lora.safetensors'} was made with other LoRA settings (2 modules differ, e.g. 0: "
            f"loha+dora rank 2, alpha 2.0 in the checkpoint; {label + ' ' if label else ''}rank 2, alpha 2.0 in this run); "
            "resume with the checkpoint's --adapter / --rank / --lora_alpha / --conv_rank / --conv_alpha")


def test_leftovers_of_killed_saves_are_removed_and_nothing_else(tmp_path):
    keep = [_state_checkpoint(tmp_path), tmp_path / "checkpoint-9", tmp_path / "notes.tmp", tmp_path / ".hidden",
            tmp_path / "lora.safetensors", tmp_path / ".config.tmp"]
    keep[1].mkdir()  # no marker: reported, not deleted
    for path in keep[2:]:
        path.write_text("mine")
    leftovers = [tmp_path / ".checkpoint-6.tmp-ab_c12x9", tmp_path / ".checkpoint-6.old-k2j3h4g5",
                 tmp_path / ".pytorch_lora_weights.safetensors.a1b2c3d4.tmp", tmp_path / ".train_summary.json.x_y_z123.tmp"]
    for path in leftovers:
        if "checkpoint" in path.name:
            path.mkdir()
            (path / "unet_lora.safetensors").write_bytes(b"0" * 100)
        else:
            path.write_bytes(b"0" * 100)
    assert sorted(remove_interrupted_saves(tmp_path)) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)


def test_a_full_disk_is_a_checkpoint_error_and_leaves_no_temporaries(tiny_filesystem):
    first = save_checkpoint(tiny_filesystem, 1, _writer(1))

    def big_file(folder):
        (folder / "weights.bin").write_bytes(os.urandom(128 * 1024))

    def big_state(folder):  # safetensors reports the full disk as its own error, not an OSError
        write_state(folder, "optimizer", {"exp_avg": torch.zeros(32 * 1024)})

    with pytest.raises(CheckpointError, match="cannot write checkpoint-2 in .*: No space left on device; the earlier"):
        save_checkpoint(tiny_filesystem, 2, big_file)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint-2 in .*: .*No space left on device \(os error 28\)"):
        save_checkpoint(tiny_filesystem, 2, big_state)
    assert [p.name for p in tiny_filesystem.iterdir()] == ["checkpoint-1"]
    assert json.loads((first / "data.json").read_text()) == {"value": 1}
