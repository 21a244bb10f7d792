"""FSDP2 sharding of the memory model over the Ray Train workers, without a full copy on every rank.

With one worker the model is a plain module on its device: there is nothing to shard, and FSDP's
all-gather/reduce-scatter copies would be pure overhead. With several, only rank 0 reads the weights
(once, on its host). Every rank builds the model's structure on the meta device (no memory), shards each
decoder layer and then the root (embeddings, final norm, tied head), allocates only its own shards on
its device, and receives their values from rank 0 (torch.distributed.checkpoint's `set_model_state_dict`
with `broadcast_from_rank0`). Buffers kept out of the state dict (RoPE's inverse frequencies) are
broadcast from rank 0's copy too. Peak memory: one full copy on rank 0's host and 1/world of the model
on each device, where loading on every rank took a full fp32 copy on every host and every device (a 7B
memory: 28 GB each) before `fully_shard` split it.
"""

from __future__ import annotations

from typing import Callable

from memo.errors import MemoError


def decoder_layers(model) -> list:
    """The repeated transformer blocks (the FSDP units), found by structure so peft-wrapped and other
    architectures work too: the first non-empty ModuleList named `...layers`/`...h`/`...blocks`."""
    import torch.nn as nn

    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return list(mod)
    raise MemoError("cannot find the model's decoder layers (a ModuleList named layers, h or blocks) to shard")


def build_model(base_path: str, device, world: int, prepare: Callable | None = None):
    """The model to train: `base_path`'s weights in fp32, `prepare(model)` applied (peft adapters,
    activation checkpointing: whatever changes its structure), on `device`; FSDP2-sharded when world > 1.
    Every rank of the process group must call it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    prepare = prepare or (lambda m: m)
    if world == 1:
        return prepare(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                            local_files_only=True)).to(device)

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    source = None
    if rank == 0:  # the one full copy: its weights (and its adapters' initial values) are every rank's
        source = prepare(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                              local_files_only=True))
    config = AutoConfig.from_pretrained(base_path, local_files_only=True)
    with torch.device("meta"):
        model = prepare(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device=device)
    set_model_state_dict(model, source.state_dict() if source is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers outside the state dict were computed at construction (on meta, so nothing): rank 0's values
    persistent = set(model.state_dict())
    names = [n for n, _ in model.named_buffers() if n not in persistent]
    values = [{n: b for n, b in source.named_buffers() if n in names} if source is not None else None]
    dist.broadcast_object_list(values, src=0)
    with torch.no_grad():
        for name in names:
            model.get_buffer(name).copy_(values[0][name].to(device))
    del source
    return model
