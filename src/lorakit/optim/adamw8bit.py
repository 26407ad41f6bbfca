"""8-bit AdamW: block-wise quantized moments (Dettmers et al., arXiv 2110.02861), in pure PyTorch.

Per parameter and step (bitsandbytes' ``Optimizer2State`` with ``optim_bits=8``):

1. dequantize the first moment ``m`` (signed dynamic map) and the second moment ``v`` (unsigned dynamic map) to fp32,
   ``code[idx] * absmax[block]`` with one fp32 absmax per block of 256 elements;
2. the standard AdamW update in fp32: bias corrections, decoupled weight decay ``p <- p (1 - lr wd)``;
3. write ``p`` back in its own dtype;
4. requantize ``m`` and ``v`` block-wise with fresh absmax.

Parameters with fewer than ``min_8bit_size`` (4096) elements keep fp32 moments (the quantization constants would
cost more than they save, and small tensors such as norms are the most sensitive), as in bnb.

The rounding is :func:`lorakit.quant.nf4.quantize_blockwise_8bit`: bnb 0.50.2's CPU kernel (a 65536-point grid over
[-1, 1], then the nearest code), so on CPU the states and updates are bit-identical to ``bnb.optim.AdamW8bit``; the
same ops run on CUDA. bnb's CUDA kernel searches the nearest code exactly instead, which resolves relative values
below ~3e-5 of the block absmax more finely (see docs/optimizers.md).

State of one parameter with ``n`` elements (``optimizer.state[p]``); every value is a tensor or an int, so
:mod:`lorakit.checkpoint` writes it to safetensors + JSON and restores it exactly:

- ``step`` (int): updates applied so far.
- 8-bit: ``exp_avg_codes`` / ``exp_avg_sq_codes`` ``[n]`` uint8, ``exp_avg_absmax`` / ``exp_avg_sq_absmax``
  ``[ceil(n / 256)]`` fp32 (2 + 8/256 bytes per element in all).
- 32-bit: ``exp_avg`` / ``exp_avg_sq`` ``[n]`` fp32 (8 bytes per element).

The update runs over the flat parameter in chunks of ``chunk_elements`` (a multiple of 256, so every block lies in
one chunk and the result does not depend on it); a chunk's fp32 temporaries bound the extra memory of a step. On
CPU the chunks are small enough (2**18) for the temporaries to stay in cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lorakit.errors import ConfigError, QuantizationError
from lorakit.quant.nf4 import create_dynamic_map, dequantize_blockwise_8bit, quantize_blockwise_8bit

BLOCKSIZE = 256  # bnb >= 0.44 (the paper used 2048)
MIN_8BIT_SIZE = 4096
CHUNK_ELEMENTS = 1 << 22  # accelerators: 4M elements, ~200 MB of fp32 temporaries per chunk at most
CPU_CHUNK_ELEMENTS = (
    1 << 18
)  # CPU: 1 MB fp32 per temporary stays in cache; 2.3x faster than 4M chunks (measured)

DYNAMIC_MAP_SIGNED = create_dynamic_map(signed=True)  # m: [256] fp32 in [-0.99297, 1]
DYNAMIC_MAP_UNSIGNED = create_dynamic_map(signed=False)  # v >= 0: [256] fp32 in [0, 1]

STATE_KEYS_8BIT = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
STATE_KEYS_32BIT = ("exp_avg", "exp_avg_sq")

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW update in fp32, in place (the op order of bnb's CPU 8-bit kernel, so the rounding matches).

    Args:
        param (torch.Tensor): ``[n]`` fp32 / bf16 / fp16, updated in place (computed in fp32, written back rounded).
        grad (torch.Tensor): ``[n]`` any float dtype.
        exp_avg (torch.Tensor): ``[n]`` fp32 first moment, updated in place.
        exp_avg_sq (torch.Tensor): ``[n]`` fp32 second moment, updated in place.
        step (int): This update's number, from 1 (bias corrections ``1 - beta**step``).
        lr (float): Learning rate.
        beta1 (float): First-moment decay.
        beta2 (float): Second-moment decay.
        eps (float): Added to ``sqrt(v_hat)``.
        weight_decay (float): Decoupled weight decay (AdamW, Loshchilov & Hutter): ``p <- p (1 - lr wd)``.
    """
    grad32 = grad.float()
    param32 = param.float()  # the same tensor when param is fp32
    exp_avg.mul_(beta1).add_(grad32, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad32, grad32, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    denom = (exp_avg_sq.sqrt() / correction2).add_(eps)  # sqrt(v_hat) + eps
    if weight_decay > 0.0:
        param32.mul_(1.0 - lr * weight_decay)
    param32.addcdiv_(exp_avg, denom, value=-lr / correction1)  # p -= lr * m_hat / (sqrt(v_hat) + eps)
    if param32 is not param:
        param.copy_(param32)


def state_slices(state: dict[str, Any], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Views of a parameter's state tensors that cover its flat elements ``start:stop``.

    Args:
        state (dict): One parameter's state (8-bit or 32-bit keys, see the module docstring).
        start (int): First element, a multiple of :data:`BLOCKSIZE`.
        stop (int): One past the last element.

    Returns:
        dict: key -> view; absmax views cover blocks ``start // 256`` to ``ceil(stop / 256)``.
    """
    if "exp_avg" in state:
        return {key: state[key][start:stop] for key in STATE_KEYS_32BIT}
    blocks = slice(start // BLOCKSIZE, -(-stop // BLOCKSIZE))
    return {
        key: state[key][blocks if key.endswith("absmax") else slice(start, stop)] for key in STATE_KEYS_8BIT
    }


def decode_moments(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 moments of :func:`state_slices` views: decoded copies (8-bit) or the views themselves (32-bit).

    Returns:
        tuple: ``exp_avg``, ``exp_avg_sq``, each ``[k]`` fp32 on the tensors' device.
    """
    if "exp_avg" in tensors:
        return tensors["exp_avg"], tensors["exp_avg_sq"]
    exp_avg = dequantize_blockwise_8bit(
        tensors["exp_avg_codes"], tensors["exp_avg_absmax"], BLOCKSIZE, DYNAMIC_MAP_SIGNED
    )
    exp_avg_sq = dequantize_blockwise_8bit(
        tensors["exp_avg_sq_codes"], tensors["exp_avg_sq_absmax"], BLOCKSIZE, DYNAMIC_MAP_UNSIGNED
    )
    return exp_avg, exp_avg_sq


def encode_moments_(
    tensors: dict[str, torch.Tensor], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor
) -> None:
    """Write updated fp32 moments into :func:`state_slices` views (requantized with fresh absmax if 8-bit).

    Raises:
        QuantizationError: A moment is NaN or Inf (8-bit codes cannot hold it; it comes from the gradient).
    """
    if "exp_avg" in tensors:
        return  # 32-bit: decode_moments returned the views, already updated in place
    # v >= 0 is non-finite whenever m is (a NaN / Inf gradient); the rounding below needs finite values
    if not bool(torch.isfinite(exp_avg_sq).all()):
        raise QuantizationError("the gradient is NaN or Inf, which 8-bit optimizer states cannot store")
    # nf4's default code is the signed map with its rounding table cached: identical to DYNAMIC_MAP_SIGNED
    codes, absmax = quantize_blockwise_8bit(exp_avg, BLOCKSIZE)
    tensors["exp_avg_codes"].copy_(codes)
    tensors["exp_avg_absmax"].copy_(absmax)
    codes, absmax = quantize_blockwise_8bit(exp_avg_sq, BLOCKSIZE, DYNAMIC_MAP_UNSIGNED)
    tensors["exp_avg_sq_codes"].copy_(codes)
    tensors["exp_avg_sq_absmax"].copy_(absmax)


def _check_hyperparameters(
    lr: float, betas: tuple[float, ...], eps: float, weight_decay: float, min_8bit_size: int, optim_bits: int
) -> None:
    def fail(field: str, expected: str, got: object) -> ConfigError:
        return ConfigError(f"optimizer {field}: expected {expected}, got {got!r}")

    if not lr >= 0:
        raise fail("lr", "a number >= 0", lr)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise fail("betas", "two numbers in [0, 1)", betas)
    if not eps >= 0:
        raise fail("eps", "a number >= 0", eps)
    if not weight_decay >= 0:
        raise fail("weight_decay", "a number >= 0", weight_decay)
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise fail("min_8bit_size", "an int >= 0", min_8bit_size)
    if optim_bits not in (8, 32):
        raise fail("optim_bits", "8 or 32", optim_bits)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored in 8 bits, block-wise (bnb ``AdamW8bit``; ~4x less state than fp32 AdamW).

    Args:
        params (iterable): Parameters or param-group dicts (any group may override the keyword defaults below).
        lr (float): Learning rate. Default: 1e-3.
        betas (tuple[float, float]): Moment decays. Default: (0.9, 0.999).
        eps (float): Added to ``sqrt(v_hat)``. Default: 1e-8.
        weight_decay (float): Decoupled weight decay. Default: 1e-2 (bnb's and torch's AdamW default).
        min_8bit_size (int): Parameters with fewer elements keep fp32 moments. Default: 4096.
        optim_bits (int): 8, or 32 to keep every moment in fp32 (what :class:`~lorakit.optim.PagedAdamW` uses).
            Default: 8.

    Raises:
        ConfigError: A hyper-parameter is out of range.
    """

    chunk_elements: int | None = None  # None: CPU_CHUNK_ELEMENTS on CPU, CHUNK_ELEMENTS elsewhere

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
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            min_8bit_size=min_8bit_size, optim_bits=optim_bits,
        )  # fmt: skip
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch's, plus a range check of its hyper-parameters, defaults and overrides alike)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(
            group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"],
            group["min_8bit_size"], group["optim_bits"],
        )  # fmt: skip

    # ---- where the state lives between steps: beside the parameter, updated in place. paged.PagedAdamW
    # ---- overrides these to keep it in pinned host memory and copy it to the parameter's device per update.

    def _zeros(self, param: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A new ``[numel]`` state tensor for ``param``, zero-filled, where its state lives."""
        return torch.zeros(numel, dtype=dtype, device=param.device)

    def _fetch(self, param: torch.Tensor, home: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state views ``home`` on ``param``'s device, for one update."""
        return home

    def _store(
        self, param: torch.Tensor, home: dict[str, torch.Tensor], work: dict[str, torch.Tensor]
    ) -> None:
        """Write the updated ``work`` tensors back into ``home``."""

    def _end_step(self) -> None:
        """Called once after every parameter of a step was updated."""

    # ---- the step

    def _init_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        n = param.numel()
        if group["optim_bits"] == 8 and n >= group["min_8bit_size"]:
            blocks = -(-n // BLOCKSIZE)
            shapes = {"codes": (n, torch.uint8), "absmax": (blocks, torch.float32)}
            tensors = {key: self._zeros(param, *shapes[key.rsplit("_", 1)[1]]) for key in STATE_KEYS_8BIT}
        else:
            tensors = {key: self._zeros(param, n, torch.float32) for key in STATE_KEYS_32BIT}
        return {"step": 0, **tensors}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every parameter that has a gradient.

        Args:
            closure (callable | None): Re-evaluates the model and returns the loss. Default: None.

        Returns:
            float | None: The closure's loss.

        Raises:
            QuantizationError: A gradient is NaN or Inf on a parameter with 8-bit state (names the parameter).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            for index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise ConfigError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state.update(self._init_state(param, group))
                state["step"] += 1
                try:
                    self._update(param, state, group)
                except QuantizationError as error:
                    raise QuantizationError(
                        f"param_groups[{group_index}] parameter {index} (shape {tuple(param.shape)}), step "
                        f"{state['step']}: {error}. Lower the learning rate, use bf16 / fp32 instead of fp16, "
                        "or skip non-finite steps (torch.amp.GradScaler does)"
                    ) from None
        self._end_step()
        return loss

    def _update(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        weights = param.detach()
        flat = weights.view(-1) if weights.is_contiguous() else weights.contiguous().view(-1)  # [n]
        grad = param.grad.reshape(-1)  # [n]
        beta1, beta2 = group["betas"]
        chunk = self.chunk_elements or (CPU_CHUNK_ELEMENTS if flat.device.type == "cpu" else CHUNK_ELEMENTS)
        for start in range(0, flat.numel(), chunk):
            stop = min(start + chunk, flat.numel())
            home = state_slices(state, start, stop)
            work = self._fetch(param, home)
            exp_avg, exp_avg_sq = decode_moments(work)  # [stop - start] fp32 each
            adamw_update_(
                flat[start:stop], grad[start:stop], exp_avg, exp_avg_sq, step=state["step"], lr=group["lr"],
                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            )  # fmt: skip
            encode_moments_(work, exp_avg, exp_avg_sq)
            self._store(param, home, work)
        if flat.data_ptr() != weights.data_ptr():  # a non-contiguous parameter was updated in a copy
            weights.copy_(flat.view(weights.shape))

    # ---- checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, keeping every state tensor's dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype, which would round
        the fp32 absmax and moments of a bf16 parameter; here the state is copied as saved (and placed where this
        optimizer keeps it), so a resumed run continues bit for bit.

        Args:
            state_dict (dict): ``{"state": {index: {...}}, "param_groups": [...]}`` as :meth:`state_dict` returns
                (tensors may be on any device).

        Raises:
            ConfigError: The saved state was written by another optimizer or does not fit these parameters.
        """
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            _check_saved_state(saved, param, saved_id, type(self).__name__)
            self.state[param] = {
                key: self._zeros(param, value.numel(), value.dtype).copy_(value.reshape(-1))
                if isinstance(value, torch.Tensor)
                else value
                for key, value in saved.items()
            }


def _check_saved_state(saved: dict[str, Any], param: torch.Tensor, saved_id: Any, optimizer: str) -> None:
    """Raise :class:`ConfigError` unless ``saved`` is a well-formed 8-bit or 32-bit state for ``param``."""
    n = param.numel()
    expected = {
        **{key: (n, torch.float32) for key in STATE_KEYS_32BIT},
        **{key: (n, torch.uint8) for key in STATE_KEYS_8BIT if key.endswith("codes")},
        **{key: (-(-n // BLOCKSIZE), torch.float32) for key in STATE_KEYS_8BIT if key.endswith("absmax")},
    }
    keys = set(saved) - {"step"}
    tensors_ok = all(
        isinstance(saved[k], torch.Tensor) and (saved[k].numel(), saved[k].dtype) == expected[k]
        for k in keys & set(expected)
    )
    if keys not in (set(STATE_KEYS_8BIT), set(STATE_KEYS_32BIT)) or not isinstance(saved.get("step"), int):
        raise ConfigError(
            f"optimizer state of parameter {saved_id} has keys {sorted(saved)}; {optimizer} expects 'step' (an int) "
            f"with {list(STATE_KEYS_8BIT)} or {list(STATE_KEYS_32BIT)}. The checkpoint was written by another "
            "optimizer: resume with the same train.optimizer"
        )
    if not tensors_ok:
        got = {k: (saved[k].numel(), saved[k].dtype) for k in keys}
        raise ConfigError(
            f"optimizer state of parameter {saved_id} does not fit a parameter of {n} elements: "
            f"got (numel, dtype) {got}; the checkpoint belongs to another model or adapter"
        )
