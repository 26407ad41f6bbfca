"""Activation checkpointing per decoder layer, optionally with the kept layer inputs offloaded to host memory.

Training keeps every tensor that backward needs: for a decoder layer that is the attention and MLP intermediates,
roughly ``10-20 x [tokens, hidden]`` per layer. Checkpointing (Chen et al., arXiv 1604.06174) keeps only each
layer's input and recomputes the layer during backward, so the saved activations shrink to ``layers x [tokens,
hidden]`` plus one layer's intermediates at a time, for about one extra forward pass of compute.

With ``offload``, even those layer inputs leave the accelerator: they are copied to pinned host memory in forward
and back in backward (Unsloth's offloaded checkpointing, transformers' ``activation_checkpointing_enable(offload=
True)``), which frees ``layers x tokens x hidden`` bytes of GPU memory, the term that grows with sequence length.
On CPU the activations already live in host memory, so there is nothing to offload.

Mechanism: transformers' decoder layers (``GradientCheckpointingLayer``) route their forward through
``layer._gradient_checkpointing_func`` when ``layer.gradient_checkpointing`` is set, keeping module hooks outside
the recomputed region and dropping KV-cache arguments; this module sets those two attributes, which is what
``PreTrainedModel.activation_checkpointing_enable`` does. ``torch.utils.checkpoint`` (non-reentrant) saves the
layer's positional inputs through the ambient saved-tensor hooks, so :class:`HostOffload` around the checkpoint
call moves exactly the layer inputs; the tensors saved inside the layer are discarded by the checkpoint.
``tests/test_activations.py`` pins both behaviours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from lorakit.errors import ConfigError


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep the tensors autograd saves in host memory until backward.

    Pack copies a tensor on an accelerator into a host tensor (pinned, so the copy back can run asynchronously)
    and records it; unpack copies it back to its device. Tensors already on the CPU are kept as they are, unless
    ``copy_host_tensors`` asks for a copy anyway (so the offload path can be tested on a machine without a GPU).

    Use it as a context manager around the forward whose saved tensors should leave the device; the same object
    may be entered many times (once per layer), and its counters add up.

    Args:
        pin_memory (bool): Pin the host copies of CUDA tensors. Default True.
        copy_host_tensors (bool): Also copy tensors that are already on the CPU. Default False.

    Attributes:
        tensors (int): Tensors copied to the host so far.
        bytes (int): Their total size in bytes.
    """

    def __init__(self, pin_memory: bool = True, copy_host_tensors: bool = False) -> None:
        self.pin_memory = pin_memory
        self.copy_host_tensors = copy_host_tensors
        self.tensors = 0
        self.bytes = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
        if tensor.device.type == "cpu" and not self.copy_host_tensors:
            return tensor.device, tensor
        pin = self.pin_memory and tensor.device.type == "cuda"
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
        host.copy_(tensor)  # a blocking copy: the device tensor may be freed and reused right after
        self.tensors += 1
        self.bytes += host.numel() * host.element_size()
        return tensor.device, host

    def _unpack(self, packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        device, host = packed
        if host.device == device and not self.copy_host_tensors:
            return host
        return host.to(device, non_blocking=host.is_pinned(), copy=True)


def _checkpoint_layer(function: Callable[..., Any], *args: Any, offload: HostOffload | None = None) -> Any:
    """Run ``function(*args)`` under non-reentrant checkpointing, its kept inputs offloaded if asked.

    Non-reentrant checkpointing needs no input that requires grad (the LoRA weights inside the layer suffice) and
    restores the RNG state for the recompute, so dropout draws the same mask twice.
    """
    if offload is None:
        return checkpoint(function, *args, use_reentrant=False)
    with offload:  # only the layer inputs pass through these hooks; checkpoint's own hooks handle the rest
        return checkpoint(function, *args, use_reentrant=False)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its ``GradientCheckpointingLayer`` modules), outermost only.

    Raises:
        ConfigError: The model has no such layers (not a transformers model, or an architecture without
            checkpointing support).
    """
    layers: list[nn.Module] = []
    inside: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(
            name.startswith(p + ".") for p in inside
        ):
            layers.append(module)
            inside.add(name)
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no transformers decoder layers (GradientCheckpointingLayer) to "
            "checkpoint; activation checkpointing needs a transformers model that supports it"
        )
    return layers


def enable_checkpointing(model: nn.Module, offload: bool | HostOffload = False) -> list[nn.Module]:
    """Checkpoint every decoder layer of ``model`` (non-reentrant), in place.

    In training (``model.train()`` and grad enabled) each layer keeps only its input for backward and recomputes
    its forward there; in eval mode or under ``no_grad`` the layers run as usual. This replaces transformers' own
    gradient checkpointing on the same layers (each layer holds one checkpoint function), so the two never nest.

    Args:
        model (nn.Module): A transformers model, possibly 4-bit and wrapped with adapters.
        offload (bool | HostOffload): With ``True``, keep the checkpointed layer inputs in pinned host memory
            when they are on a CUDA device (on CPU there is nothing to offload: a warning says so and the layers
            are checkpointed only). A :class:`HostOffload` instance is used as given (its counters then show
            what moved; ``HostOffload(copy_host_tensors=True)`` exercises the path on CPU). Default False.

    Returns:
        list[nn.Module]: The checkpointed layers.

    Raises:
        ConfigError: The model has no decoder layers to checkpoint, or ``offload`` has the wrong type.
    """
    if not isinstance(offload, (bool, HostOffload)):
        raise ConfigError(f"offload: expected true, false or a HostOffload, got {offload!r}")
    layers = decoder_layers(model)
    hooks = offload if isinstance(offload, HostOffload) else None
    if offload is True:
        if any(p.device.type == "cuda" for p in model.parameters()):
            hooks = HostOffload()
        else:
            warnings.warn(
                "activation offload: the model is not on a CUDA device, so its activations already live in host "
                "memory and there is nothing to offload; the decoder layers are checkpointed only",
                UserWarning,
                stacklevel=2,
            )
    function = functools.partial(_checkpoint_layer, offload=hooks)
    for layer in layers:
        layer._gradient_checkpointing_func = function
        layer.gradient_checkpointing = True
    return layers


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
HEAP_MMAP_THRESHOLD = 128 * 1024  # glibc's initial (and minimum dynamic) threshold


def return_freed_memory_to_os(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with ``mmap``, so that freed activations
    go back to the OS at once; for training on CPU.

    glibc's threshold is dynamic: freeing an mmapped block raises it to that block's size, up to 32 MB. After the
    first large tensor is freed, the 0.1-32 MB tensors of a training step (activations, casts, gradients) come from
    the heap, and what they free stays in the process, fragmented; RSS then keeps the high-water mark of every
    layer's temporaries, not of the live tensors. Measured on a 6-layer TinyLlama-shaped QLoRA step on CPU: peak
    RSS 1.94 GB with the dynamic threshold, 1.17 GB with it fixed at 128 KiB (``docs/memory.md``). Fixing it (as
    ``MALLOC_MMAP_THRESHOLD_`` does) costs a page fault on every page of every fresh allocation: training steps
    measured 2.2x (3.4M-parameter model) and 2.5x (111M) slower on CPU, most of it system time. So it is opt-in
    (recipe ``train.lean_cpu_heap``). It changes the whole process's allocator and lasts until the process ends.

    Args:
        threshold (int): Allocations of at least this many bytes use mmap. Default 128 KiB.

    Returns:
        bool: Whether the setting was applied (False where the C library is not glibc).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def disable_checkpointing(model: nn.Module) -> None:
    """Turn per-layer checkpointing (and any offload) off again: the layers keep their activations."""
    for layer in decoder_layers(model):
        layer.gradient_checkpointing = False


__all__ = [
    "HostOffload",
    "decoder_layers",
    "disable_checkpointing",
    "enable_checkpointing",
    "return_freed_memory_to_os",
]
