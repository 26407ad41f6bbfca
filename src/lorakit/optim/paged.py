"""Paged AdamW: optimizer state kept in pinned host memory and brought to the GPU only for its own update.

bitsandbytes' paged optimizers (QLoRA §3, "Paged Optimizers") allocate large states in CUDA unified memory and let
the driver evict pages to CPU RAM when the GPU runs out, e.g. during an activation spike on a long sequence.
PyTorch has no public managed-memory allocator, so this is the explicit version of the same idea: the state of
every CUDA parameter with at least ``min_paged_size`` elements lives in pinned CPU memory between steps; for each
parameter (chunk by chunk, see :class:`~lorakit.optim.AdamW8bit`) it is copied to the GPU with ``non_blocking``
copies, updated by exactly the same code as the unpaged optimizer, and copied back; the step ends with one
synchronization so the host copy is complete when the step returns. The GPU then holds one chunk's state at a
time instead of all of it, at the price of moving the state over PCIe twice a step (2.03 bytes per element for
8-bit state, 8 for 32-bit).

Smaller states stay on the GPU, as in bnb (which pages states of at least 1e5 elements): copying many small tensors
costs more time than the memory it frees. Parameters that are not on CUDA have nothing to page; their state stays
beside them and the updates are those of the unpaged optimizer (a warning says so once).
"""

from __future__ import annotations

import warnings

import torch

from lorakit.errors import ConfigError
from lorakit.optim.adamw8bit import MIN_8BIT_SIZE, AdamW8bit, ParamsT

MIN_PAGED_SIZE = 100_000  # bnb's threshold (optim/optimizer.py::get_state_buffer)


class PagedAdamW(AdamW8bit):
    """AdamW with fp32 state in pinned host memory on CUDA (bnb ``PagedAdamW``; same update as ``AdamW8bit``).

    Args:
        params (iterable): Parameters or param-group dicts.
        lr (float): Learning rate. Default: 1e-3.
        betas (tuple[float, float]): Moment decays. Default: (0.9, 0.999).
        eps (float): Added to ``sqrt(v_hat)``. Default: 1e-8.
        weight_decay (float): Decoupled weight decay. Default: 1e-2.
        min_8bit_size (int): With ``optim_bits=8``, smaller parameters keep fp32 moments. Default: 4096.
        optim_bits (int): 32 (fp32 moments) or 8 (block-wise 8-bit moments). Default: 32.
        min_paged_size (int): CUDA parameters with fewer elements keep their state on the GPU. Default: 100000.

    Raises:
        ConfigError: A hyper-parameter is out of range.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = MIN_8BIT_SIZE,
        optim_bits: int = 32,
        min_paged_size: int = MIN_PAGED_SIZE,
    ) -> None:
        if isinstance(min_paged_size, bool) or not isinstance(min_paged_size, int) or min_paged_size < 0:
            raise ConfigError(f"optimizer min_paged_size: expected an int >= 0, got {min_paged_size!r}")
        self.min_paged_size = min_paged_size
        self._devices_to_sync: set[torch.device] = set()
        super().__init__(
            params, lr, betas, eps, weight_decay, min_8bit_size=min_8bit_size, optim_bits=optim_bits
        )
        if not any(p.device.type == "cuda" for group in self.param_groups for p in group["params"]):
            warnings.warn(
                f"{type(self).__name__}: no parameter is on a CUDA device, so there is nothing to page; the "
                f"optimizer states stay beside the parameters and the updates are those of the unpaged optimizer",
                stacklevel=2
                if type(self).__init__ is PagedAdamW.__init__
                else 3,  # the caller, past a subclass
            )

    def pages(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s state lives in pinned host memory between steps."""
        return param.device.type == "cuda" and param.numel() >= self.min_paged_size

    def _zeros(self, param: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if not self.pages(param):
            return super()._zeros(param, numel, dtype)
        # pinned (page-locked) so that the copies to and from the GPU can run asynchronously
        return torch.zeros(numel, dtype=dtype, pin_memory=param.device.type == "cuda")

    def _fetch(self, param: torch.Tensor, home: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.pages(param):
            return home
        return {key: t.to(param.device, non_blocking=True, copy=True) for key, t in home.items()}

    def _store(
        self, param: torch.Tensor, home: dict[str, torch.Tensor], work: dict[str, torch.Tensor]
    ) -> None:
        if not self.pages(param):
            return
        for key, tensor in home.items():
            tensor.copy_(work[key], non_blocking=True)  # queued after the update on the same stream
        if param.device.type == "cuda":
            self._devices_to_sync.add(param.device)

    def _end_step(self) -> None:
        # the host copies are complete only once the GPU has run the queued copies; a checkpoint may read them next
        for device in self._devices_to_sync:
            torch.cuda.synchronize(device)
        self._devices_to_sync.clear()


class PagedAdamW8bit(PagedAdamW):
    """8-bit AdamW with its state in pinned host memory on CUDA (bnb ``PagedAdamW8bit``).

    The arguments are those of :class:`PagedAdamW`; only ``optim_bits`` defaults to 8.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = MIN_8BIT_SIZE,
        optim_bits: int = 8,
        min_paged_size: int = MIN_PAGED_SIZE,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay,
            min_8bit_size=min_8bit_size, optim_bits=optim_bits, min_paged_size=min_paged_size,
        )  # fmt: skip
