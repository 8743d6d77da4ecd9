"""convlora.training.distributed: which setup a run asked for and got, and whole LoRA / optimizer
tensors out of (and back into) real FSDP2 shards. The 2-process launches are in
test_train_distributed.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from train_script_helpers import free_port

import convlora
from convlora.testing import randomize_lora_
from convlora.training.distributed import (
    DistributedSetupError,
    check_parallelism,
    frozen_local_share,
    full_tensors,
    requested_parallelism,
)

FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def _accelerator(kind: str, n: int = 2):
    """What check_parallelism reads of an Accelerator: its distributed type and process count."""
    return SimpleNamespace(distributed_type=f"DistributedType.{kind}", num_processes=n)


@pytest.mark.parametrize("env, expected", [
    ({}, "DATA_PARALLEL"),
    ({"ACCELERATE_USE_FSDP": "false"}, "DATA_PARALLEL"),
    (FSDP2_ENV, "FSDP2"),
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP1"),  # accelerate's own default version
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP1"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED"),
])
def test_requested_parallelism_reads_the_launcher_environment(env, expected):
    assert requested_parallelism(env) == expected


def test_what_runs_is_reported_and_fsdp2_on_cpu_processes_is_sharded_by_the_script():
    ddp = check_parallelism(_accelerator("MULTI_CPU"), env={})
    assert (ddp.requested, ddp.running, ddp.shard_here, ddp.sharded) == ("DATA_PARALLEL", "MULTI_CPU", False, False)
    assert ddp.describe() == "distributed type: MULTI_CPU (DDP: every process holds the whole model), 2 processes"
    cpu_fsdp = check_parallelism(_accelerator("MULTI_CPU"), env=FSDP2_ENV)
    assert cpu_fsdp.shard_here and cpu_fsdp.sharded
    assert cpu_fsdp.describe().startswith("distributed type: FSDP2 (torch fully_shard over gloo, applied by the script")
    gpu_fsdp = check_parallelism(_accelerator("FSDP"), env=FSDP2_ENV)
    assert gpu_fsdp.sharded and not gpu_fsdp.shard_here and gpu_fsdp.describe() == "distributed type: FSDP2 (accelerate), 2 processes"
    assert check_parallelism(_accelerator("NO", 1), env={}).describe() == "distributed type: NO, 1 process"


@pytest.mark.parametrize("env, kind, n, validating, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "MULTI_CPU", 2, False, "asks for DeepSpeed \\(accelerate set up MULTI_CPU\\); this script does not support"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED", 2, False, "ZeRO partitions"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP", 2, False, "FSDP2 only: set fsdp_version: 2"),
    (FSDP2_ENV, "NO", 1, False, "asks for FSDP but accelerate set up NO with 1 process"),
    (FSDP2_ENV, "MULTI_GPU", 2, False, "asks for FSDP but accelerate set up MULTI_GPU"),
    (FSDP2_ENV, "MULTI_CPU", 2, True, "validation images are sampled by the main process alone"),
    (FSDP2_ENV, "FSDP", 2, True, "train without --validation_prompt under FSDP"),
])
def test_a_setup_the_config_did_not_get_is_refused(env, kind, n, validating, message):
    with pytest.raises(DistributedSetupError, match=message):
        check_parallelism(_accelerator(kind, n), validating=validating, env=env)


@pytest.fixture
def gloo_world_of_one(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded_lora_model():
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0", "2"]))
    convlora.mark_only_lora_as_trainable(model)
    randomize_lora_(model)
    expected = {k: v.clone() for k, v in convlora.lora_state_dict(model).items()}
    fully_shard(model[2])
    fully_shard(model)
    return model, expected


def test_full_tensors_gathers_fsdp2_shards_and_restores_them(gloo_world_of_one, tmp_path):
    from torch.distributed.tensor import DTensor

    model, expected = _sharded_lora_model()
    optimizer = torch.optim.AdamW(list(convlora.adapter_parameters(model).values()), lr=1e-2)
    model(torch.randn(3, 8)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    shards = dict(convlora.adapter_parameters(model))
    assert all(isinstance(p, DTensor) for p in shards.values()) and frozen_local_share([model]) == 1.0  # one process holds all
    trained = {k: p.full_tensor().clone() for k, p in shards.items()}
    with full_tensors([model], optimizer):
        inside = convlora.adapter_parameters(model)
        assert not any(isinstance(p, DTensor) for p in inside.values())
        assert all(torch.equal(inside[k], trained[k]) for k in trained)
        state = optimizer.state_dict()["state"]
        assert not any(isinstance(v, DTensor) for s in state.values() for v in s.values())
        path = convlora.save_lora(model, tmp_path / "lora.safetensors")
        saved_optimizer = copy.deepcopy(optimizer.state_dict())  # as read back from a checkpoint: no shared storage
    after = convlora.adapter_parameters(model)
    assert all(after[k] is shards[k] for k in shards)  # the very same FSDP parameters again
    assert all(isinstance(v, DTensor) for s in optimizer.state.values() for k, v in s.items() if k != "step")
    tensors, _ = convlora.read_safetensors(path)
    assert sorted(tensors) == sorted(expected) and all(torch.equal(tensors[k], trained[k]) for k in tensors)  # plain keys

    # write_back: what is loaded inside lands in the shards; loaded optimizer state is split again
    fresh, _ = _sharded_lora_model()
    fresh_optimizer = torch.optim.AdamW(list(convlora.adapter_parameters(fresh).values()), lr=1e-2)
    with full_tensors([fresh], fresh_optimizer, write_back=True):
        convlora.load_lora(fresh, path)
        fresh_optimizer.load_state_dict(saved_optimizer)
    loaded = convlora.adapter_parameters(fresh)
    assert all(isinstance(p, DTensor) and torch.equal(p.full_tensor(), trained[k]) for k, p in loaded.items())
    exp_avg = [s["exp_avg"] for s in fresh_optimizer.state.values()]
    assert exp_avg and all(isinstance(t, DTensor) for t in exp_avg)
    x = torch.randn(3, 8)
    for m, opt in ((model, optimizer), (fresh, fresh_optimizer)):
        m(x).square().sum().backward()
        opt.step()
    assert all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in
               zip(convlora.adapter_parameters(model).values(), convlora.adapter_parameters(fresh).values()))


def test_full_tensors_changes_nothing_without_fsdp():
    model = nn.Sequential(nn.Linear(4, 4))
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0"]))
    before = dict(convlora.adapter_parameters(model))
    with full_tensors([model], torch.optim.AdamW(list(before.values()))):
        assert all(convlora.adapter_parameters(model)[k] is p for k, p in before.items())
    assert frozen_local_share([model]) == 1.0
