"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the student, applied by distillery itself.

Why not Accelerate's FSDP: Accelerate selects FSDP only on accelerators (on a CPU machine it silently runs
DDP), and its wrapping assumes the model's own forward produces the loss. Our loop reads the student's
final hidden states and applies the LM head inside the fused chunked loss, so the head's weight is used
outside any wrapped forward. Sharding here keeps one code path that runs, and is tested, on CPU (gloo)
and GPU (NCCL) alike:

* every decoder layer is its own FSDP unit; the root unit is the ``HiddenStates`` wrapper, which holds
  what is left (embeddings, final norm, LM head; tied or not). The root does not reshard after its
  forward (FSDP2 keeps the root gathered for the backward that follows), so the loss reads the gathered
  head weight, and its gradient is reduce-scattered with the root's by FSDP's final backward callback;
* checkpoints are always full (gathered on every rank, written by the main process): model weights in
  the usual ``model.safetensors``, optimizer state keyed by parameter name, so a run resumes on any
  number of processes, with or without FSDP;
* validation runs on every rank (each layer's all-gather is a collective) with the root gathered.

Launch with ``accelerate launch --config_file configs/accelerate/fsdp.yaml``; the launcher's
``ACCELERATE_USE_FSDP`` turns this on for any multi-process run. Honoured from the launch config:
``fsdp_reshard_after_forward``. Not supported together with FSDP (one-line errors): on-policy steps
(ranks would generate different numbers of tokens, so their collectives would not match) and QAT.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import DistilleryError


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def fsdp_requested(distributed_type: str, world: int) -> bool:
    """FSDP when Accelerate chose it (accelerators) or the launcher asked for it and there is more than one
    process (on CPU Accelerate would otherwise fall back to DDP without a word)."""
    if distributed_type == "FSDP":
        return True
    return world > 1 and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def check_fsdp_recipe(cfg) -> None:
    """Refuse what the FSDP path cannot do, before any work."""
    if cfg.generation.on_policy_fraction > 0:
        raise DistilleryError("generation.on_policy_fraction > 0 is not supported with FSDP: ranks generate "
                              "different numbers of tokens, so their all-gathers would not match; use DDP")
    if cfg.qat.enabled:
        raise DistilleryError("qat.enabled is not supported with FSDP (it swaps the student's layers); use DDP")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise DistilleryError(f"FSDP: {type(model).__name__} has no base_model.layers to shard (Llama/Qwen2-style expected)")
    return list(layers)


def shard(wrapper: torch.nn.Module, student: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """Shard ``student`` in place (one unit per decoder layer) and make ``wrapper`` the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for layer in decoder_layers(student):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(wrapper, mesh=mesh, reshard_after_forward=False)  # the loss reads the gathered head after forward
    return wrapper


@contextlib.contextmanager
def gathered_root(wrapper: torch.nn.Module | None):
    """The root unit's parameters (embeddings, norm, head) gathered for a use outside its forward
    (validation); every rank must enter it. A no-op without FSDP."""
    if wrapper is None:
        yield
        return
    # Make the wrapper FSDP's root before any layer runs alone (a run resumed at its last step validates
    # before any training forward); private, but what the root's own first forward would call.
    wrapper._get_fsdp_state()._lazy_init()
    wrapper.unshard()
    try:
        yield
    finally:
        wrapper.reshard()


def full_model_state(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank calls this (collectives); the main process gets whole CPU tensors, the others {}."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(student, options=_full_options())


def full_optimizer_state(student: torch.nn.Module, optimizer) -> dict:
    """Optimizer state keyed by parameter name (every rank calls; the main process gets it whole)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(student, optimizer, options=_full_options())


def load_named_optimizer_state(student: torch.nn.Module, optimizer, state: dict) -> None:
    """Load a name-keyed optimizer state (as written by :func:`full_optimizer_state`) into ``optimizer``,
    sharded or not; every rank reads the whole state and keeps its part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(student, optimizer, state, options=StateDictOptions(full_state_dict=True))


def is_named_optimizer_state(state: dict) -> bool:
    groups = state.get("param_groups") or [{}]
    return any(isinstance(p, str) for p in groups[0].get("params", []))


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def named_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> dict:
    """``state`` keyed by parameter name: an index-keyed ``optimizer.state_dict()`` (written by a run
    without FSDP) is renamed by the order of ``optimizer``'s parameters, which ``make_optimizer`` takes
    from ``named_parameters`` whether or not the model is sharded; a name-keyed one is returned as is."""
    if is_named_optimizer_state(state):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def plain_copy(student: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded model of the student's class and config holding ``state`` (for ``save_pretrained``)."""
    with torch.device("meta"):
        model = type(student)(student.config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, buf in student.named_buffers():  # FSDP does not shard buffers (rotary tables): copy them
        mod, _, attr = name.rpartition(".")
        model.get_submodule(mod)._buffers[attr] = buf.detach().to("cpu", copy=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise DistilleryError(f"FSDP: the gathered student state lacks {missing[:3]}")
    return model.eval()
