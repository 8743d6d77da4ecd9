"""What the accelerate config asked for, what actually runs, and the FSDP2 steps a LoRA run needs.

accelerate decides the distributed type itself and does not say when it ignores the config:
with ``distributed_type: FSDP`` (or ``DEEPSPEED``) and ``use_cpu: true`` it runs plain DDP
(``MULTI_CPU``), because it turns FSDP on only for GPU-like devices (``AcceleratorState`` checks
``MULTI_GPU``, ``MULTI_XPU``, ...; never ``MULTI_CPU``). :func:`check_parallelism` compares the
launcher's request (the ``ACCELERATE_USE_FSDP`` / ``FSDP_VERSION`` / ``ACCELERATE_USE_DEEPSPEED``
variables ``accelerate launch`` exports from the config) with ``accelerator.distributed_type`` and
refuses a mismatch, except FSDP2 over CPU processes, which :func:`shard_on_cpu` runs with torch's
own ``fully_shard`` (the FSDP2 that accelerate applies on GPUs).

Under FSDP2 every parameter of a sharded model is a ``DTensor`` holding 1/N of dim 0. Saving needs
the whole LoRA tensors and loading must split them again; both are collectives, so every process
runs them (:func:`full_tensors`), and only the main process writes the files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MethodType

import torch
from torch import nn

from convlora.inject import adapter_parameters

logger = logging.getLogger(__name__)

class DistributedSetupError(ValueError):
    """The accelerate config asked for a distributed setup that this run does not get."""


@dataclass(frozen=True)
class Parallelism:
    """The distributed setup of a run.

    Attributes:
        requested: what the accelerate config asked for: ``"FSDP2"``, ``"FSDP1"``, ``"DEEPSPEED"``
            or ``"DATA_PARALLEL"`` (DDP / one process: nothing beyond accelerate's default).
        running: ``accelerator.distributed_type`` as accelerate set it up (``"MULTI_CPU"``, ``"FSDP"``, ...).
        num_processes: processes over all machines.
        shard_here: the trained models are sharded by :func:`shard_on_cpu` (FSDP2 asked, CPU
            processes): ``accelerator.prepare`` must not wrap them in DDP.
    """

    requested: str
    running: str
    num_processes: int
    shard_here: bool = False

    @property
    def sharded(self) -> bool:
        """The trained models' parameters are FSDP2 shards (DTensors)."""
        return self.shard_here or self.running == "FSDP"

    def describe(self) -> str:
        if self.shard_here:
            how = "FSDP2 (torch fully_shard over gloo, applied by the script: accelerate runs FSDP only on GPUs)"
        elif self.running == "FSDP":
            how = "FSDP2 (accelerate)"
        elif self.running in ("MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU"):
            how = f"{self.running} (DDP: every process holds the whole model)"
        else:
            how = self.running
        return f"distributed type: {how}, {self.num_processes} process{'es' if self.num_processes > 1 else ''}"


def requested_parallelism(env: Mapping[str, str] | None = None) -> str:
    """What the launcher's environment asks for (see :class:`Parallelism.requested`)."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DEEPSPEED"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP2" if env.get("FSDP_VERSION", "1") == "2" else "FSDP1"
    return "DATA_PARALLEL"


def check_parallelism(accelerator, validating: bool = False, env: Mapping[str, str] | None = None) -> Parallelism:
    """The setup this run gets, or an error when it is not the one the config asked for.

    Args:
        validating: the run samples validation images (in the main process only, which a sharded
            UNet cannot do: its forward is a collective).

    Raises:
        DistributedSetupError: DeepSpeed was asked for (not supported: see the README), FSDP1 was
            asked for, FSDP2 was asked for and accelerate set up neither FSDP nor CPU processes, or
            FSDP2 with validation.
    """
    requested = requested_parallelism(env)
    running = str(accelerator.distributed_type).rpartition(".")[2]
    n = accelerator.num_processes
    if requested == "DEEPSPEED":
        raise DistributedSetupError(
            f"the accelerate config asks for DeepSpeed (accelerate set up {running}); this script does not support "
            "DeepSpeed: its checkpoints hold the whole LoRA and optimizer state, which ZeRO partitions. "
            "Use distributed_type: FSDP with fsdp_version: 2 (accelerate_config_fsdp.yaml) or MULTI_GPU."
        )
    if requested == "FSDP1":
        raise DistributedSetupError(
            "the accelerate config asks for FSDP version 1; this script supports FSDP2 only: set fsdp_version: 2 "
            "(accelerate_config_fsdp.yaml)"
        )
    if requested == "FSDP2" and validating and running in ("FSDP", "MULTI_CPU"):
        raise DistributedSetupError(
            "validation images are sampled by the main process alone, which an FSDP-sharded UNet cannot do; "
            "train without --validation_prompt under FSDP and sample from the saved LoRA file"
        )
    if requested == "FSDP2" and running == "FSDP":
        return Parallelism(requested, running, n)
    if requested == "FSDP2" and running == "MULTI_CPU":
        return Parallelism(requested, running, n, shard_here=True)
    if requested == "FSDP2":
        raise DistributedSetupError(
            f"the accelerate config asks for FSDP but accelerate set up {running} with {n} process(es); "
            "FSDP needs GPU processes, or at least 2 CPU processes (use_cpu: true, num_processes)"
        )
    return Parallelism(requested, running, n)


def prepare_sharding(parallel: Parallelism, accelerator, models: Sequence[nn.Module]) -> None:
    """Under FSDP2: check that the config's wrap rule fits every trained model, then (CPU
    processes) shard them with :func:`shard_on_cpu`. Does nothing without FSDP.

    Raises:
        DistributedSetupError: accelerate's wrap rule names a class a model lacks (accelerate would
            fail the same way inside ``accelerator.prepare``).
    """
    if not parallel.sharded:
        return
    for model in models:
        _wrap_policy(model, accelerator)
    if parallel.shard_here:
        for model in models:
            shard_on_cpu(model, accelerator)


def _wrap_policy(model: nn.Module, accelerator):
    """accelerate's FSDP2 wrap rule for ``model`` (a predicate on modules, or None: the root only)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()  # the FSDP_* variables
    try:
        return fsdp2_prepare_auto_wrap_policy(plugin, model)
    except ValueError as err:
        raise DistributedSetupError(
            f"FSDP cannot wrap the {type(model).__name__}: {err} accelerate looks up every class of "
            "fsdp_transformer_layer_cls_to_wrap (or, without it, of the model's _no_split_modules) in each trained "
            "model; CLIPTextModel lists CLIPVisionEmbeddings, which it lacks. With --train_text_encoder use "
            "fsdp_auto_wrap_policy: NO_WRAP (each model is one FSDP unit)."
        ) from None


def shard_on_cpu(model: nn.Module, accelerator) -> nn.Module:
    """FSDP2-shard ``model`` in place over the CPU processes, as accelerate shards it on GPUs.

    The wrap rule is accelerate's, read from the launcher's ``FSDP_*`` variables: with
    ``TRANSFORMER_BASED_WRAP`` each module of the classes in ``fsdp_transformer_layer_cls_to_wrap``
    (default: the model's ``_no_split_modules``) becomes its own FSDP unit, then the root. The
    parameters keep their dtypes (frozen weights in the mixed-precision dtype, LoRA in float32:
    the script casts them; no FSDP mixed-precision cast), and under bf16 the forward runs in
    autocast with float32 outputs, as ``accelerator.prepare`` would have wrapped it.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin, convert_outputs_to_fp32, get_module_children_bottom_up
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    plugin = FullyShardedDataParallelPlugin()
    options = {
        "mesh": init_device_mesh("cpu", (accelerator.num_processes,)),
        "reshard_after_forward": plugin.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(),
    }
    policy = _wrap_policy(model, accelerator)
    if policy is not None:
        for module in get_module_children_bottom_up(model)[:-1]:
            if policy(module) and not isinstance(module, FSDPModule):
                fully_shard(module, **options)
    fully_shard(model, **options)
    if accelerator.native_amp:
        forward = accelerator.autocast()(model.forward.__func__)
        model.forward = MethodType(convert_outputs_to_fp32(forward), model)
    return model


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def full_tensors(models: Sequence[nn.Module], optimizer: torch.optim.Optimizer | None = None,
                 write_back: bool = False) -> Iterator[None]:
    """Inside: the models' adapter parameters and the optimizer state are whole tensors.

    Without FSDP this does nothing. Under FSDP2 each sharded adapter parameter is swapped for a
    plain parameter holding the gathered tensor, and each sharded optimizer state tensor for its
    gathered value, so ``save_lora`` / ``optimizer.state_dict()`` see the full values. On exit the
    shards are restored; with ``write_back`` they are first overwritten by this process's slice
    of the (possibly newly loaded) full values, and optimizer state loaded inside is split the same
    way. Every process must enter it (gathering is a collective), in the same order of models.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    swapped = _swap_in_full_parameters(models)
    sharded_state = _gather_optimizer_state(inner) if inner is not None else {}
    try:
        yield
    finally:
        for module, name, shard in swapped:
            full = module._parameters[name]
            if write_back:
                with torch.no_grad():
                    shard.copy_(_split_like(full.detach(), shard))
            module._parameters[name] = shard
        if inner is not None:
            _reshard_optimizer_state(inner, sharded_state, write_back)


def _swap_in_full_parameters(models: Sequence[nn.Module]) -> list[tuple[nn.Module, str, nn.Parameter]]:
    swapped = []
    for model in models:
        adapter = {id(p) for p in adapter_parameters(model).values()}
        # by the model's own parameter names: an adapter's A and B belong to its LoRAAdapter module
        for qualified, param in model.named_parameters():
            if id(param) not in adapter or not is_sharded(param):
                continue
            path, _, name = qualified.rpartition(".")
            module = model.get_submodule(path)
            module._parameters[name] = nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad)
            swapped.append((module, name, param))
    return swapped


def _gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    """Replace every sharded state tensor by its full value; return the shards (by param id)."""
    shards: dict[int, dict[str, torch.Tensor]] = {}
    for group in optimizer.param_groups:  # the same order on every process
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and is_sharded(value):
                    shards.setdefault(id(param), {})[key] = value
                    state[key] = value.full_tensor()
    return shards


def _reshard_optimizer_state(optimizer: torch.optim.Optimizer, shards: Mapping[int, Mapping[str, torch.Tensor]],
                             write_back: bool) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in list(state.items()):
                kept = shards.get(id(param), {}).get(key)
                if kept is not None and not write_back:
                    state[key] = kept
                elif is_sharded(param) and isinstance(value, torch.Tensor) and not is_sharded(value) \
                        and tuple(value.shape) == tuple(param.shape):
                    state[key] = _split_like(value, param)


def _split_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's piece of ``full`` as a DTensor placed like ``like`` (local slicing, no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def frozen_local_share(models: Sequence[nn.Module]) -> float:
    """The share of the models' frozen weight elements held by this process: 1.0 unsharded
    (DDP, one process), about 1/N when FSDP shards them over N processes."""
    local = total = 0
    for model in models:
        for param in model.parameters():
            if not param.requires_grad:
                local += param.to_local().numel() if is_sharded(param) else param.numel()
                total += param.numel()
    return local / total if total else 1.0
