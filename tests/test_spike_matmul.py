"""The spike-sparse training product (ops/spike_matmul.py, csrc/spike_matmul.c) and SpikeLinear's training path.

The op's output and its three gradients against F.linear's (float32 rounding only) and the float64
reference, over empty and full inputs, every spike value, odd sizes (output features not a multiple
of the kernel's tile, one input feature), bias or none, 3-D and non-contiguous inputs, several
threads (the same bits as one); which backend ran (the C kernel below the density threshold, dense
above it and for what the kernel does not run: bfloat16, autocast, torch.func transforms); gradients
for every subset of inputs that needs them (a frozen weight, an input without one, the bias alone); and
a SpikeLM training step through it against the dense step.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.layers import SpikeLinear
from spikelm.ops import record_backends
from spikelm.ops.spike_matmul import MAX_DENSITY, c_kernel_available, naive_spike_matmul, spike_matmul

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not c_kernel_available(), reason="no C compiler: spike_matmul runs dense")]


def random_spikes(shape, density: float, max_spike: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    fired = torch.rand(shape, generator=g) < density
    return (torch.randint(1, max_spike + 1, shape, generator=g) * fired).float()


def _grads(fn, x, w, b, dy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = fn(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


def _close(got, want, what):
    for name, g, r in zip(("y", "dx", "dw", "db"), got, want):
        if r is None:
            assert g is None, (what, name)
            continue
        scale = r.abs().max().clamp_min(1.0)
        assert (g - r).abs().max() <= 2e-6 * scale, (what, name, float((g - r).abs().max()), float(scale))


@pytest.mark.parametrize("rows,i,o,density,bias", [
    (64, 48, 96, 0.1, False), (33, 19, 45, 0.2, True), (5, 1, 7, 0.5, True), (40, 130, 31, 0.05, False),
    (16, 64, 2048, 0.12, False)])
def test_matches_dense_and_the_reference(rows, i, o, density, bias):
    x = random_spikes((rows, i), density)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(o, i, generator=g)
    b = torch.randn(o, generator=g) if bias else None
    dy = torch.randn(rows, o, generator=g)
    with record_backends() as ran:
        got = _grads(lambda x, w, b: spike_matmul(x, w, b, max_density=1.0), x, w, b, dy)
    assert ran == [("spike_matmul", "c")]
    _close(got, _grads(F.linear, x, w, b, dy), "dense")
    ref = naive_spike_matmul(x, w, b)
    assert (got[0] - ref).abs().max() <= 2e-6 * ref.abs().max().clamp_min(1.0)


def test_every_spike_value_empty_and_full_inputs():
    g = torch.Generator().manual_seed(2)
    w, dy = torch.randn(40, 24, generator=g), torch.randn(9, 40, generator=g)
    values = ((torch.arange(9)[:, None] + torch.arange(24)) % 9).float()  # 0..8 in every column
    for x in (values, torch.zeros(9, 24), torch.full((9, 24), 3.0)):
        with record_backends() as ran:
            got = _grads(lambda x, w, b: spike_matmul(x, w, b, max_density=1.0), x, w, None, dy)
        assert ran == [("spike_matmul", "c")]
        _close(got, _grads(F.linear, x, w, None, dy), f"x = {x[0, :4].tolist()}...")
    y, _, dw, _ = _grads(lambda x, w, b: spike_matmul(x, w, b, max_density=1.0), torch.zeros(9, 24), w, None, dy)
    assert not y.any() and not dw.any()


@pytest.mark.parametrize("x_grad,w_grad,b_grad", [(True, False, False), (False, True, False), (False, False, True),
                                                  (True, False, True)])
def test_only_the_gradients_asked_for(x_grad, w_grad, b_grad):
    g = torch.Generator().manual_seed(7)
    x = random_spikes((12, 20), 0.1).requires_grad_(x_grad)
    w = torch.randn(9, 20, generator=g).requires_grad_(w_grad)
    b = torch.randn(9, generator=g).requires_grad_(b_grad)
    dy = torch.randn(12, 9, generator=g)
    with record_backends() as ran:
        spike_matmul(x, w, b).backward(dy)
    assert ran == [("spike_matmul", "c")]
    want = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w, b)]
    F.linear(*want).backward(dy)
    for got, ref in zip((x, w, b), want):
        assert (got.grad is None) == (ref.grad is None)
        if ref.grad is not None:
            torch.testing.assert_close(got.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_3d_and_non_contiguous_inputs():
    x = random_spikes((3, 11, 80), 0.15)[..., ::2]  # [3, 11, 40], strided channels
    assert not x.is_contiguous()
    g = torch.Generator().manual_seed(3)
    w, dy = torch.randn(50, 40, generator=g), torch.randn(3, 11, 50, generator=g)
    got = _grads(spike_matmul, x, w, None, dy)
    assert got[0].shape == (3, 11, 50) and got[1].shape == x.shape
    _close(got, _grads(F.linear, x, w, None, dy), "strided 3-D")


def test_threads_give_the_same_bits():
    x = random_spikes((257, 96), 0.1)
    g = torch.Generator().manual_seed(4)
    w, dy = torch.randn(200, 96, generator=g), torch.randn(257, 200, generator=g)
    one = _grads(spike_matmul, x, w, None, dy)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        three = _grads(spike_matmul, x, w, None, dy)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one[:3], three[:3]):
        assert torch.equal(a, b)


def test_dense_above_the_density_threshold_and_where_the_kernel_does_not_run():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(30, 20, generator=g)
    sparse, dense = random_spikes((16, 20), MAX_DENSITY / 2), random_spikes((16, 20), 0.9)
    with record_backends() as ran:
        spike_matmul(sparse, w)
        spike_matmul(dense, w)
        spike_matmul(sparse.bfloat16(), w.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            spike_matmul(sparse, w)
        spike_matmul(sparse, w, max_density=0.0)
    assert ran == [("spike_matmul", "c")] + [("spike_matmul", "dense")] * 4


def test_shape_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match=r"last dimension \(7\).*in_features \(8\)"):
        spike_matmul(torch.zeros(2, 7), torch.zeros(3, 8))


def test_spike_linear_trains_through_it_and_set_sparse_training_turns_it_off():
    layer = SpikeLinear(32, 16, bias=False)
    x = random_spikes((4, 10, 32), 0.1).requires_grad_()
    with record_backends() as ran:
        layer(x).sum().backward()
        with torch.no_grad():
            layer(x)  # inference: not this op
    assert ran == [("spike_matmul", "c")]
    layer.sparse_training = False
    with record_backends() as ran:
        layer(x).sum().backward()
    assert ran == []


def test_a_spikelm_training_step_matches_the_dense_step():
    torch.manual_seed(0)
    config = SpikeLMConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, block_types=["ssm", "attention"],
                           num_attention_heads=2, max_position_embeddings=64)
    model = SpikeLMForCausalLM(config)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))

    def step(sparse: bool):
        model.zero_grad(set_to_none=True)
        model.set_sparse_training(sparse)
        with record_backends() as ran:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, ran

    loss_s, grads_s, ran_s = step(True)
    loss_d, grads_d, ran_d = step(False)
    assert ("spike_matmul", "c") in ran_s and not any(op == "spike_matmul" for op, _ in ran_d)
    assert torch.allclose(loss_s, loss_d, rtol=1e-5, atol=1e-6)
    for name, g in grads_d.items():
        # rounding-level differences in the products reach the spikes only through ties at a threshold
        assert torch.allclose(grads_s[name], g, rtol=1e-3, atol=1e-5), name


def test_torch_func_transforms_take_the_dense_products():
    g = torch.Generator().manual_seed(6)
    w, x = torch.randn(12, 10, generator=g), random_spikes((4, 10), 0.1)
    with record_backends() as ran:
        dw = torch.func.grad(lambda w: spike_matmul(x, w).square().sum())(w)
    assert ran == [("spike_matmul", "dense")]
    torch.testing.assert_close(dw, torch.func.grad(lambda w: F.linear(x, w).square().sum())(w))
