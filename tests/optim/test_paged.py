"""Paged AdamW (CPU: nothing to page, same updates; the copy-in / copy-out path; CUDA residency) and the factory."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.optim import OPTIMIZERS, AdamW8bit, PagedAdamW, PagedAdamW8bit, build_optimizer
from lorakit.recipe import OPTIMIZERS as RECIPE_OPTIMIZERS

SHAPES = [(64, 130), (40, 50)]  # 8-bit state and fp32 state (2000 < 4096) under optim_bits=8
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PAGED = [(PagedAdamW, 32), (PagedAdamW8bit, 8)]


def _twins(shapes, device: str = "cpu") -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    init = [torch.randn(shape, device=device) for shape in shapes]
    return [torch.nn.Parameter(t.clone()) for t in init], [torch.nn.Parameter(t.clone()) for t in init]


def _step_both(first: torch.optim.Optimizer, second: torch.optim.Optimizer, a, b) -> None:
    for p, q in zip(a, b):
        grad = torch.randn(p.shape, device=p.device)
        p.grad, q.grad = grad.clone(), grad.clone()
    first.step()
    second.step()


def _state_tensors(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v for k, v in optimizer.state[param].items() if isinstance(v, torch.Tensor)}


def _assert_same_states(first, second, a, b) -> None:
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        mine, theirs = _state_tensors(first, p), _state_tensors(second, q)
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key].cpu(), theirs[key].cpu()), key


@pytest.mark.parametrize("paged_cls, bits", PAGED)
def test_on_cpu_it_says_so_and_updates_like_the_unpaged_optimizer(paged_cls, bits):
    a, b = _twins(SHAPES)
    with pytest.warns(UserWarning, match="nothing to page"):
        paged = paged_cls(a, lr=1e-2, weight_decay=0.1)
    plain = AdamW8bit(b, lr=1e-2, weight_decay=0.1, optim_bits=bits)
    for _ in range(4):
        _step_both(paged, plain, a, b)
    _assert_same_states(paged, plain, a, b)


class _HostPaged(PagedAdamW8bit):
    """Pages CPU parameters too (into ordinary host memory), so the copy-in / copy-out path runs without a GPU."""

    def pages(self, param: torch.Tensor) -> bool:
        return param.numel() >= self.min_paged_size

    def _fetch(self, param, home):
        work = super()._fetch(param, home)
        if self.pages(param):
            self.copies += [w.data_ptr() != h.data_ptr() for w, h in zip(work.values(), home.values())]
        return work


def test_paging_path_copies_state_in_and_out_and_changes_no_bit():
    a, b = _twins(SHAPES)
    with pytest.warns(UserWarning, match="nothing to page"):
        paged = _HostPaged(a, lr=1e-2, weight_decay=0.1, min_paged_size=5000)  # pages the [64, 130] only
    paged.copies, paged.chunk_elements = [], 1024  # 9 chunks, the last one partial
    plain = AdamW8bit(b, lr=1e-2, weight_decay=0.1)
    _step_both(paged, plain, a, b)
    homes = {key: t.data_ptr() for key, t in _state_tensors(paged, a[0]).items()}
    for _ in range(3):
        _step_both(paged, plain, a, b)
    assert {key: t.data_ptr() for key, t in _state_tensors(paged, a[0]).items()} == homes  # state stays home
    assert len(paged.copies) == 4 * 9 * 4 and all(paged.copies)  # steps x chunks x state tensors, all copies
    _assert_same_states(paged, plain, a, b)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("paged_cls, bits", PAGED)
def test_cuda_state_lives_in_pinned_host_memory_and_updates_equal_unpaged(paged_cls, bits):
    shapes = [(512, 512), (64, 80)]  # 262144 elements are paged; 5120 (< 100000) stay on the GPU
    a, b = _twins(shapes, device="cuda")
    paged = paged_cls(a, lr=1e-2, weight_decay=0.1)
    paged.chunk_elements = 1 << 16  # 4 chunks: several copies in flight before the step's synchronization
    plain = AdamW8bit(b, lr=1e-2, weight_decay=0.1, optim_bits=bits)
    for _ in range(3):
        _step_both(paged, plain, a, b)
        for tensor in _state_tensors(paged, a[0]).values():
            assert tensor.device.type == "cpu" and tensor.is_pinned()
        for tensor in _state_tensors(paged, a[1]).values():
            assert tensor.is_cuda
    _assert_same_states(paged, plain, a, b)
    gpu_bytes = sum(
        t.numel() * t.element_size() for p in a for t in _state_tensors(paged, p).values() if t.is_cuda
    )
    assert gpu_bytes == sum(t.numel() * t.element_size() for t in _state_tensors(paged, a[1]).values())


@pytest.mark.gpu
@CUDA
def test_adamw8bit_on_cuda_tracks_cpu():
    """Same ops on both devices; a 1-ulp difference may move an element to the neighbouring code, rarely."""
    lr, steps = 1e-3, 3
    cpu = [torch.nn.Parameter(torch.randn(shape)) for shape in [(64, 130), (300, 33)]]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    on_cpu, on_gpu = AdamW8bit(cpu, lr=lr), AdamW8bit(gpu, lr=lr)
    for _ in range(steps):
        for p, q in zip(cpu, gpu):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.cuda()
        on_cpu.step()
        on_gpu.step()
    for p, q in zip(cpu, gpu):
        diff = (q.detach().cpu() - p.detach()).abs()
        assert (diff <= 1e-6).float().mean() > 0.99
        assert diff.max() <= 2 * lr * steps
        codes = on_cpu.state[p]["exp_avg_codes"] == on_gpu.state[q]["exp_avg_codes"].cpu()
        assert codes.float().mean() > 0.99


# ---- factory


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_recipe_name_builds_its_optimizer(name):
    params = [torch.nn.Parameter(torch.zeros(4))]
    if name.startswith("paged"):
        with pytest.warns(UserWarning, match="nothing to page"):
            optimizer = build_optimizer(params, name, lr=2e-4, weight_decay=0.05)
    else:
        optimizer = build_optimizer(params, name, lr=2e-4, weight_decay=0.05)
    assert type(optimizer) is OPTIMIZERS[name]
    assert optimizer.param_groups[0]["lr"] == 2e-4 and optimizer.param_groups[0]["weight_decay"] == 0.05
    expected = {
        "adamw": torch.optim.AdamW, "adamw_8bit": AdamW8bit,
        "paged_adamw": PagedAdamW, "paged_adamw_8bit": PagedAdamW8bit,
    }  # fmt: skip
    assert type(optimizer) is expected[name]


def test_factory_knows_exactly_the_recipe_names():
    assert tuple(OPTIMIZERS) == RECIPE_OPTIMIZERS


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'adam8bit'.*adamw, adamw_8bit, paged_adamw, paged_adamw_8bit"):
        build_optimizer([torch.nn.Parameter(torch.zeros(4))], "adam8bit", lr=1e-3, weight_decay=0.0)


def test_param_groups_and_extra_arguments_pass_through():
    a, b = torch.nn.Parameter(torch.zeros(64, 64)), torch.nn.Parameter(torch.zeros(8))
    c = torch.nn.Parameter(torch.zeros(96, 64))  # e.g. an embedding kept in 32-bit (the paper's advice)
    groups = [
        {"params": [a], "lr": 1e-2},
        {"params": [b]},
        {"params": [c], "optim_bits": 32},
    ]  # LoRA+-style lrs
    optimizer = build_optimizer(
        groups, "adamw_8bit", lr=1e-3, weight_decay=0.0, betas=(0.8, 0.9), min_8bit_size=8
    )
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3, 1e-3]
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert ["exp_avg_codes" in optimizer.state[p] for p in (a, b, c)] == [True, True, False]
    assert (
        optimizer.param_groups[1]["betas"] == (0.8, 0.9) and optimizer.param_groups[0]["min_8bit_size"] == 8
    )
    with pytest.raises(ConfigError, match="min_paged_size"):
        build_optimizer([a], "paged_adamw", lr=1e-3, weight_decay=0.0, min_paged_size=-1)


def test_adamw_takes_the_fused_kernel_and_steps_as_torchs_loop():
    """``adamw`` builds torch's fused AdamW for plain tensors (a generator of them and param groups too); its
    steps equal the default per-parameter loop's to float rounding."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(16, 96)), torch.nn.Parameter(torch.randn(80, 16))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    fused = build_optimizer((p for p in ours), "adamw", lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True and fused.param_groups[0]["params"] == ours
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        loop.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    groups = build_optimizer([{"params": ours[0], "lr": 1e-3}], "adamw", lr=1e-2, weight_decay=0.0)
    assert groups.defaults["fused"] is True and groups.param_groups[0]["params"] == [ours[0]]


def test_adamw_keeps_the_loop_where_the_fused_kernel_does_not_apply():
    """An explicit ``foreach`` (or ``fused``) is the caller's; a non-float parameter keeps torch's default."""
    a = torch.nn.Parameter(torch.zeros(4))
    assert build_optimizer([a], "adamw", lr=1e-3, weight_decay=0.0, foreach=True).defaults["fused"] is None
    assert build_optimizer([a], "adamw", lr=1e-3, weight_decay=0.0, fused=False).defaults["fused"] is False
    ints = torch.nn.Parameter(torch.zeros(4, dtype=torch.int32), requires_grad=False)
    assert build_optimizer([a, ints], "adamw", lr=1e-3, weight_decay=0.0).defaults["fused"] is None
