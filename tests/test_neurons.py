"""DSN: parallel form == serial form, gradients, surrogates; baselines share the interface."""
import math

import pytest
import torch

from spikelm.neurons import DSN, LIF, PSN, DSNState, SlidingPSN, quantize_spikes, unfold_spikes
from spikelm.ops import naive_scan, record_backends
from spikelm.ops.dsn import c_backend, dsn, dsn_step, naive_dsn


def _serial(neuron, x, state=None):
    outs = []
    for t in range(x.shape[1]):
        s, state = neuron.step(x[:, t], state)
        outs.append(s)
    return torch.stack(outs, dim=1), state


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
@pytest.mark.parametrize("spike_mode", ["integer", "binary"])
def test_forward_equals_loop_of_step(kernel_size, spike_mode):
    neuron = DSN(24, kernel_size=kernel_size, spike_mode=spike_mode)
    x = 2 * torch.randn(3, 200, 24)
    with torch.no_grad():
        spikes, state, membrane = neuron(x, return_state=True, return_membrane=True)
        serial, serial_state = _serial(neuron, x)
    assert torch.equal(spikes, serial)
    torch.testing.assert_close(serial_state.membrane, state.membrane, atol=1e-5, rtol=0)
    torch.testing.assert_close(serial_state.conv, state.conv)
    assert set(spikes.unique().tolist()) <= set(range(neuron.max_spike + 1))


def test_chunks_carrying_state_equal_one_pass():
    neuron = DSN(16)
    x = 2 * torch.randn(2, 301, 16)
    with torch.no_grad():
        whole, whole_state = neuron(x, return_state=True)
        pieces, state = [], None
        for a, b in [(0, 1), (1, 3), (3, 100), (100, 101), (101, 301)]:
            s, state = neuron(x[:, a:b], state, return_state=True)
            pieces.append(s)
        # a serial step continues the parallel state too
        s_next, _ = neuron.step(x[:, -1], state)
    assert torch.equal(torch.cat(pieces, dim=1), whole)
    torch.testing.assert_close(state.membrane, whole_state.membrane, atol=1e-5, rtol=0)
    assert s_next.shape == (2, 16)


def test_membrane_matches_the_definition():
    """H_t = alpha H_{t-1} + (1 - alpha) X_t with alpha = sigmoid(conv(X))^(1/tau), against a float64 loop."""
    neuron = DSN(8, kernel_size=3, tau=0.5).double()
    x = torch.randn(2, 50, 8, dtype=torch.float64)
    _, membrane = neuron(x.float(), return_membrane=True)
    w, b = neuron.conv_weight, neuron.conv_bias
    xp = torch.nn.functional.pad(x, (0, 0, 2, 0))
    logit = b + sum(xp[:, j : j + 50] * w[:, j] for j in range(3))
    alpha = torch.sigmoid(logit) ** (1 / 0.5)
    h, _ = naive_scan((1 - alpha) * x, torch.log(alpha))
    torch.testing.assert_close(membrane.double(), h.detach(), atol=1e-5, rtol=1e-5)


def test_gradients_reach_input_and_decay_conv():
    neuron = DSN(8)
    x = (2 * torch.randn(2, 40, 8)).requires_grad_()
    neuron(x).pow(2).sum().backward()
    for p in (x, neuron.conv_weight, neuron.conv_bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_gradients_match_float64_autograd_of_the_definition():
    neuron = DSN(6, kernel_size=2)
    x = (2 * torch.randn(1, 30, 6, dtype=torch.float64)).requires_grad_()
    neuron.double()
    out = neuron(x, return_membrane=True)[1]
    g1 = torch.autograd.grad(out.sum(), [x, neuron.conv_weight])
    neuron_naive = DSN(6, kernel_size=2, backend="naive").double()
    neuron_naive.load_state_dict(neuron.state_dict())
    out2 = neuron_naive(x, return_membrane=True)[1]
    g2 = torch.autograd.grad(out2.sum(), [x, neuron_naive.conv_weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_documents_do_not_leak():
    neuron = DSN(8)
    lengths = [5, 1, 17, 2]
    cu = torch.tensor([0, 5, 6, 23, 25])
    x = 2 * torch.randn(1, 25, 8)
    with torch.no_grad():
        packed, state = neuron(x, cu_seqlens=cu, return_state=True)
        for n, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
            alone, alone_state = neuron(x[:, s:e], return_state=True)
            assert torch.equal(packed[:, s:e], alone)
            torch.testing.assert_close(state.membrane[n], alone_state.membrane[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(state.conv[n], alone_state.conv[0])
    assert len(lengths) == state.membrane.shape[0]


def test_decay_init_spreads_memory():
    neuron = DSN(64)
    alpha = torch.sigmoid(neuron.conv_bias.detach().double()) ** (1 / neuron.tau)
    assert alpha.min().item() == pytest.approx(0.5, abs=1e-6) and alpha.max().item() == pytest.approx(0.999, abs=1e-6)
    assert (alpha.diff() > 0).all()


def test_rect_surrogate_is_straight_through_on_clip_range():
    h = torch.tensor([-1.0, -0.1, 0.0, 0.4, 0.6, 2.5, 3.9, 4.0, 4.2, 9.0], requires_grad=True)
    s = quantize_spikes(h, 4, "rect")
    assert s.tolist() == [0, 0, 0, 0, 1, 3, 4, 4, 4, 4]
    s.sum().backward()
    assert h.grad.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]


def test_atan_surrogate_matches_formula():
    h = torch.linspace(-1, 2, 31, requires_grad=True)
    quantize_spikes(h, 1, "atan", alpha=2.0).sum().backward()
    want = (2.0 / 2) / (1 + (math.pi / 2 * 2.0 * (h.detach() - 0.5)) ** 2)
    torch.testing.assert_close(h.grad, want)
    # integer mode: one bump per threshold, peaks at 0.5, 1.5, ...
    h2 = torch.tensor([0.5, 1.5, 1.0], requires_grad=True)
    quantize_spikes(h2, 2, "atan").sum().backward()
    assert h2.grad[0] > h2.grad[2] and h2.grad[1] > h2.grad[2]


def test_unfold_spikes_sums_back():
    s = torch.randint(0, 5, (3, 7, 4)).float()
    u = unfold_spikes(s, 4)
    assert u.shape == (4, 3, 7, 4) and set(u.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(u.sum(0), s)
    with pytest.raises(ValueError, match="integers in"):
        unfold_spikes(s + 0.5, 4)


def test_bfloat16_input_keeps_float32_membrane():
    neuron = DSN(8)
    x = torch.randn(2, 20, 8).bfloat16()
    s, state = neuron(x, return_state=True)
    assert s.dtype == torch.bfloat16 and state.membrane.dtype == torch.float32
    s1, st1 = neuron.step(x[:, 0])
    assert st1.membrane.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tau=0), "tau"), (dict(tau=-1.0), "tau"), (dict(max_spike=0), "max_spike"),
        (dict(kernel_size=0), "kernel_size"), (dict(spike_mode="ternary"), "spike_mode"),
        (dict(surrogate="sigmoid"), "surrogate"), (dict(channels=0), "channels"),
    ],
)
def test_dsn_bad_arguments(kwargs, match):
    args = dict(channels=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DSN(**args)


def test_dsn_bad_inputs():
    neuron = DSN(4)
    with pytest.raises(ValueError, match=r"shape \[B, T, C=4\]"):
        neuron(torch.randn(4, 4))
    with pytest.raises(ValueError, match="channels"):
        neuron(torch.randn(1, 3, 5))
    with pytest.raises(TypeError, match="floating"):
        neuron(torch.ones(1, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, C=4\]"):
        neuron.step(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="state shapes"):
        neuron(torch.randn(2, 3, 4), DSNState(torch.zeros(1, 4), torch.zeros(1, 3, 4)))


@pytest.mark.parametrize("make", [lambda: LIF(8), lambda: LIF(8, reset="soft"), lambda: PSN(8, T=64),
                                  lambda: SlidingPSN(8, k=3)])
def test_baselines_share_the_interface(make):
    neuron = make()
    x = (3 * torch.randn(2, 40, 8)).requires_grad_()
    s = neuron(x)
    assert s.shape == x.shape and set(s.unique().tolist()) <= {0.0, 1.0}
    s.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda: LIF(8), lambda: SlidingPSN(8, k=3)])
def test_stateful_baselines_step_equals_forward(make):
    neuron = make()
    x = 3 * torch.randn(2, 30, 8)
    with torch.no_grad():
        assert torch.equal(neuron(x), _serial(neuron, x)[0])


def test_lif_resets():
    x = torch.full((1, 4, 1), 4.0)  # H jumps past threshold every step
    hard, soft = LIF(1, beta=0.5, reset="hard"), LIF(1, beta=0.5, reset="soft")
    _, v_hard = hard(x, return_state=True)
    _, v_soft = soft(x, return_state=True)
    assert v_hard.item() == 0.0  # V_reset
    # soft: H = 0.5*V + 2, V = H - 1 -> fixed point V = 2
    assert 1.0 < v_soft.item() <= 2.0


def test_psn_is_causal_and_bounded_by_T():
    neuron = PSN(4, T=16)
    x = 3 * torch.randn(1, 16, 4)
    y = x.clone()
    y[:, 10:] = -y[:, 10:]
    assert torch.equal(neuron(x)[:, :10], neuron(y)[:, :10])
    assert torch.equal(neuron(x[:, :7]), neuron(x)[:, :7])  # shorter windows are prefixes
    with pytest.raises(ValueError, match="built for T=16"):
        neuron(torch.randn(1, 17, 4))
    with pytest.raises(ValueError, match="keeps no state"):
        neuron(x, return_state=True)


def test_baseline_bad_arguments():
    with pytest.raises(ValueError, match="reset"):
        LIF(4, reset="none")
    with pytest.raises(ValueError, match="T must be"):
        PSN(4, T=0)
    with pytest.raises(ValueError, match="k must be"):
        SlidingPSN(4, k=0)


def _op(backend, x, w, b, tau, N, surrogate, history=None, h0=None, cu=None):
    """(spikes, final membrane) of ops.dsn on `backend`, asserting that this backend is the one that ran."""
    state = None if history is None and h0 is None else DSNState(h0, history)
    with record_backends() as ran:
        out = dsn(x, w, b, tau, N, surrogate, initial_state=state, cu_seqlens=cu, output_final_state=True,
                  backend=backend)
    assert ran == [("dsn", backend)]
    return out.spikes, out.final_state.membrane


def _reference(x, w, b, tau, N, surrogate, history=None, h0=None, cu=None):
    """(spikes, final membrane) of the package's float64 reference."""
    spikes, _, last, _ = naive_dsn(x, w, b, tau, N, surrogate, history=history, initial_membrane=h0, cu_seqlens=cu)
    return spikes, last


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
@pytest.mark.parametrize("surrogate", ["rect", "atan"])
@pytest.mark.parametrize("layout", ["plain", "carried", "packed", "packed_h0"])
def test_fused_torch_function_matches_autograd_composition(kernel_size, surrogate, layout):
    """ops.dsn's torch backend (one Function, hand-written backward) == autograd of the float64 definition."""
    torch.manual_seed(kernel_size)
    B, T, C, tau, N = 2, 37, 5, 0.25, 3
    cu = history = h0 = None
    if layout.startswith("packed"):
        B, cu = 1, torch.tensor([0, 1, 1, 9, 10, 30, T])  # an empty document and one-step documents
        if layout == "packed_h0":
            h0 = torch.randn(6, C, dtype=torch.float64).requires_grad_()
    elif layout == "carried":
        history = torch.randn(B, kernel_size - 1, C, dtype=torch.float64).requires_grad_()
        h0 = torch.randn(B, C, dtype=torch.float64).requires_grad_()
    x = (2 * torch.randn(B, T, C, dtype=torch.float64)).requires_grad_()
    w = torch.randn(C, kernel_size, dtype=torch.float64).requires_grad_()
    b = (torch.randn(C, dtype=torch.float64) + 2).requires_grad_()
    b.data[0] = -30  # one channel always at the decay floor
    inputs = [t for t in (x, w, b, history, h0) if t is not None]
    gs, gl = torch.randn(B, T, C, dtype=torch.float64), torch.randn(h0.shape if h0 is not None else (len(cu) - 1 if cu is not None else B, C), dtype=torch.float64)

    s1, last1 = _op("torch", x, w, b, tau, N, surrogate, history, h0, cu)
    s2, last2 = _reference(x, w, b, tau, N, surrogate, history, h0, cu)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(last1, last2, atol=1e-12, rtol=1e-12)
    g1 = torch.autograd.grad((s1 * gs).sum() + (last1 * gl).sum(), inputs)
    g2 = torch.autograd.grad((s2 * gs).sum() + (last2 * gl).sum(), inputs)
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-9)
    assert g1[0].abs().sum() > 0 and g1[1].abs().sum() > 0


def test_dsn_module_uses_the_fused_function_on_cpu_with_the_composition_gradients():
    neuron = DSN(8, kernel_size=3)
    x = (2 * torch.randn(2, 40, 8)).requires_grad_()
    grad = torch.randn(2, 40, 8)
    fused = torch.autograd.grad((neuron(x) * grad).sum(), [x, neuron.conv_weight, neuron.conv_bias])
    reference = DSN(8, kernel_size=3, backend="naive")
    reference.load_state_dict(neuron.state_dict())
    with record_backends() as ran:
        spikes, _ = reference(x, return_membrane=True)
        assert torch.equal(spikes, neuron(x))
    assert ran == [("dsn", "naive"), ("dsn", "c" if c_backend.available() else "torch")]
    composed = torch.autograd.grad((spikes * grad).sum(), [x, reference.conv_weight, reference.conv_bias])
    for a, e in zip(fused, composed):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_fused_function_survives_inference_mode_and_a_retained_graph():
    """The torch backend's reusable scratch buffers stay normal tensors after an inference_mode forward, and a
    packed backward leaves its saved tensors untouched, so a retained graph runs backward twice."""
    neuron = DSN(8, backend="torch")
    with record_backends() as ran:
        with torch.inference_mode():
            neuron(torch.randn(2, 64, 8))  # the first call allocates the scratch buffers
        x = (2 * torch.randn(1, 64, 8)).requires_grad_()
        spikes = neuron(x, cu_seqlens=torch.tensor([0, 20, 64]))
    assert ran == [("dsn", "torch")] * 2
    first = torch.autograd.grad(spikes.sum(), x, retain_graph=True)[0]
    second = torch.autograd.grad(spikes.sum(), x)[0]
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="history"):
        dsn(x, neuron.conv_weight, neuron.conv_bias, 0.25, 4, initial_state=DSNState(None, torch.zeros(1, 3, 8)),
            cu_seqlens=torch.tensor([0, 64]))


@pytest.mark.parametrize("kernel", ["torch", "c"])
def test_fused_function_input_gradient_is_exact_for_long_memory_channels(kernel):
    """Long memories stay exact in float32: (1 - alpha) u uses expm1 (torch Function), and the C kernel's
    recurrences read only 1 - alpha (H += (1 - alpha)(x - H)); a rounded alpha near 1 would compound
    over the sequence (measured: 1e-4 relative error at T = 3000, 1e-2 at 16k)."""
    if kernel == "c" and not c_backend.available():
        pytest.skip(f"C kernel: {c_backend.unavailable_reason()}")
    torch.manual_seed(0)
    C, T = 5, 3000
    x = (2 * torch.randn(1, T, C, dtype=torch.float64)).requires_grad_()
    w = torch.zeros(C, 4, dtype=torch.float64)
    b = torch.tensor([3.0, 12.0, 14.5, 16.0, 20.0], dtype=torch.float64)  # 1 - alpha from ~2e-1 down to ~8e-9
    grad = torch.randn(1, T, C, dtype=torch.float64)
    spikes, last = _op("torch", x, w, b, 0.25, 4, "rect")
    want = torch.autograd.grad((spikes * grad).sum() + last.sum(), x)[0]
    xf = x.detach().float().requires_grad_()
    spikes32, last32 = _op(kernel, xf, w.float(), b.float(), 0.25, 4, "rect")
    got = torch.autograd.grad((spikes32 * grad.float()).sum() + last32.sum(), xf)[0]
    assert ((last32.double() - last).abs() <= 1e-5 * last.abs() + 1e-6).all()
    scale = want.abs().amax(dim=(0, 1))  # per channel
    assert ((got.double() - want).abs().amax(dim=(0, 1)) <= 1e-4 * scale + 1e-12).all()


# -- the compiled C kernel (ops/dsn/c_backend.py): the CPU training path when it builds ---------------------

needs_c_kernel = pytest.mark.skipif(not c_backend.available(), reason=f"C kernel: {c_backend.unavailable_reason()}")


@needs_c_kernel
@pytest.mark.parametrize("kernel_size", [1, 2, 4])
@pytest.mark.parametrize("surrogate", ["rect", "atan"])
@pytest.mark.parametrize("layout", ["plain", "carried", "packed", "packed_h0"])
@pytest.mark.parametrize("tau", [0.25, 1.0])
@pytest.mark.parametrize("checkpoint_rows", [1, 5, 64])
def test_c_kernel_matches_float64_composition(kernel_size, surrogate, layout, tau, checkpoint_rows, monkeypatch):
    """float32 C kernel == float64 autograd of the definition: the same spikes, gradients to float32 rounding.
    checkpoint_rows: the saved-membrane stride (5: document starts fall on and inside recomputed blocks)."""
    monkeypatch.setattr(c_backend, "CHECKPOINT_ROWS", checkpoint_rows)

    torch.manual_seed(kernel_size)
    B, T, C, N = 2, 37, 300, 3  # C > the kernel's channel block (256): two work items per row
    cu = history = h0 = None
    if layout.startswith("packed"):
        B, cu = 1, torch.tensor([0, 1, 1, 9, 10, 30, T])  # an empty document and one-step documents
        if layout == "packed_h0":
            h0 = torch.randn(6, C, dtype=torch.float64)
    elif layout == "carried":
        history = torch.randn(B, kernel_size - 1, C, dtype=torch.float64)
        h0 = torch.randn(B, C, dtype=torch.float64)
    x = 2 * torch.randn(B, T, C, dtype=torch.float64)
    w = torch.randn(C, kernel_size, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64) + 2
    b[0] = -30  # one channel always at the decay floor
    b[1] = 18  # one channel with 1 - alpha ~ 1e-8
    inputs64 = [t.requires_grad_() for t in (x, w, b, history, h0) if t is not None]
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    n_states = h0.shape[0] if h0 is not None else (len(cu) - 1 if cu is not None else B)
    gs, gl = torch.randn(B, T, C, dtype=torch.float64), torch.randn(n_states, C, dtype=torch.float64)

    def run(tensors, kernel):
        x_, w_, b_ = tensors[:3]
        hist_ = tensors[3] if history is not None else None
        h0_ = tensors[-1] if h0 is not None else None
        if kernel is None:
            return _reference(x_, w_, b_, tau, N, surrogate, hist_, h0_, cu)
        return _op(kernel, x_, w_, b_, tau, N, surrogate, hist_, h0_, cu)

    s1, last1 = run(inputs32, "c")
    s2, last2 = run(inputs64, None)
    assert s1.dtype == torch.float32 and torch.equal(s1.double(), s2)
    torch.testing.assert_close(last1.double(), last2, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad((s1 * gs.float()).sum() + (last1 * gl.float()).sum(), inputs32)
    g2 = torch.autograd.grad((s2 * gs).sum() + (last2 * gl).sum(), inputs64)
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a.double(), e, atol=1e-5 * float(e.abs().max()) if e.numel() else 0, rtol=1e-4)
    assert g1[0].abs().sum() > 0 and g1[1].abs().sum() > 0


@needs_c_kernel
def test_dsn_module_runs_the_c_kernel_with_the_torch_function_results():
    """backend auto (C kernel) and backend torch (torch Function) agree on spikes, state and gradients, also in
    bfloat16 and with two threads; each module runs the backend it names (no silent fallback)."""
    torch.manual_seed(0)
    fast, ref = DSN(24, kernel_size=4), DSN(24, kernel_size=4, backend="torch")
    ref.load_state_dict(fast.state_dict())
    x = 2 * torch.randn(3, 200, 24)
    grad = torch.randn(3, 200, 24)
    threads = torch.get_num_threads()
    try:
        for n_threads, dtype in [(1, torch.float32), (2, torch.float32), (1, torch.bfloat16)]:
            torch.set_num_threads(n_threads)
            results = []
            for neuron, backend in ((fast, "c"), (ref, "torch")):
                xi = x.to(dtype).requires_grad_()
                with record_backends() as ran:
                    s, state = neuron(xi, return_state=True)
                assert ran == [("dsn", backend)]
                gx, gw = torch.autograd.grad((s.float() * grad).sum() + state.membrane.sum(), [xi, neuron.conv_weight])
                results.append((s, state.membrane, gx, gw))
            (s1, m1, gx1, gw1), (s2, m2, gx2, gw2) = results
            assert s1.dtype == dtype
            assert (s1 != s2).float().mean() < 1e-3  # a membrane within rounding of a threshold may round either way
            torch.testing.assert_close(m1, m2, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(gx1.float(), gx2.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-2)
            torch.testing.assert_close(gw1, gw2, atol=1e-2, rtol=1e-3)
    finally:
        torch.set_num_threads(threads)


@needs_c_kernel
def test_c_kernel_reads_a_strided_input_in_place():
    """One half of a projection's output (channels contiguous, rows strided) gives what its copy gives."""
    both = (2 * torch.randn(2, 50, 2 * 40)).requires_grad_()
    w, b = torch.randn(40, 4), torch.randn(40) + 2
    grad = torch.randn(2, 50, 40)
    view = both[..., 40:]
    copy = view.detach().contiguous().requires_grad_()
    assert not view.is_contiguous()
    s1, last1 = _op("c", view, w, b, 0.25, 4, "rect")
    s2, last2 = _op("c", copy, w, b, 0.25, 4, "rect")
    assert torch.equal(s1, s2) and torch.equal(last1, last2)
    g1 = torch.autograd.grad((s1 * grad).sum() + last1.sum(), both)[0]
    g2 = torch.autograd.grad((s2 * grad).sum() + last2.sum(), copy)[0]
    assert torch.equal(g1[..., 40:], g2) and not g1[..., :40].any()


def test_c_kernel_declines_what_it_does_not_compute():
    """A non-integer 1/tau, float64, 17 taps or the membrane as an output go to the torch backend under
    backend="auto"; backend="c" says why it cannot run them."""
    x = torch.randn(1, 10, 4)
    w, b = torch.randn(4, 4), torch.randn(4)
    supports = lambda *a: c_backend.unsupported(*a) is None  # noqa: E731
    assert supports(x, 4, 0.5, "atan", False) and supports(x, 4, 1 / 8, "rect", False)
    assert not supports(x, 4, 0.3, "rect", False)
    assert not supports(x.double(), 4, 0.25, "rect", False)
    assert not supports(x, 17, 0.25, "rect", False)
    assert not supports(x, 4, 0.25, "rect", True)
    with record_backends() as ran:
        s_auto = dsn(x, w, b, 0.3, 4).spikes
        dsn(x, w, b, 0.25, 4, output_membrane=True)
    assert ran == [("dsn", "torch")] * 2
    s_torch, _ = _op("torch", x, w, b, 0.3, 4, "rect")
    assert torch.equal(s_auto, s_torch)
    with pytest.raises(ValueError, match="backend='c' cannot run this call: 1/tau must be an integer"):
        dsn(x, w, b, 0.3, 4, backend="c")
    with pytest.raises(ValueError, match="backend must be one of"):
        dsn(x, w, b, 0.25, 4, backend="cuda")
    with pytest.raises(ValueError, match="batch size 1"):
        dsn(torch.randn(2, 10, 4), w, b, 0.25, 4, cu_seqlens=torch.tensor([0, 4, 10]))


def test_dsn_falls_back_to_torch_without_the_c_kernel(tmp_path):
    """SPIKELM_CPU_KERNEL=0 (or no compiler): the DSN still trains, through the torch Function."""
    import subprocess
    import sys

    code = ("import torch; from spikelm.ops import record_backends; from spikelm.ops.dsn import c_backend\n"
            "from spikelm.neurons import DSN\n"
            "assert not c_backend.available() and 'SPIKELM_CPU_KERNEL=0' in c_backend.unavailable_reason()\n"
            "x = torch.randn(2, 30, 8, requires_grad=True)\n"
            "with record_backends() as ran: DSN(8)(x).sum().backward()\n"
            "assert x.grad is not None and ran == [('dsn', 'torch')], ran\n")
    env = dict(__import__("os").environ, SPIKELM_CPU_KERNEL="0", SPIKELM_CACHE_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@needs_c_kernel
def test_c_kernel_builds_into_an_empty_cache(tmp_path):
    """A fresh cache directory: the first use compiles the kernel there (atomically renamed into place)."""
    import subprocess
    import sys

    code = "from spikelm.ops.dsn import c_backend; assert c_backend.available(), c_backend.unavailable_reason()"
    env = dict(__import__("os").environ, SPIKELM_CACHE_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    files = list((tmp_path / "kernels").iterdir())
    built = [f for f in files if f.suffix == ".so"]
    assert len(built) == 1 and built[0].name.startswith("dsn_cpu-")
    assert {f.name for f in files} - {built[0].name} == {built[0].with_suffix(".lock").name}  # nothing half-written


# -- the op family's contract: one reference, one step, backends named alike, no silent fallback -------------

@pytest.mark.parametrize("kernel_size", [1, 2, 4])
@pytest.mark.parametrize("surrogate", ["rect", "atan"])
def test_step_matches_the_float64_reference(kernel_size, surrogate):
    """A loop of ops.dsn_step from a carried state == one naive_dsn call: spikes, states and gradients."""
    torch.manual_seed(kernel_size)
    B, T, C, N = 2, 12, 5, 3
    x = (2 * torch.randn(B, T, C, dtype=torch.float64)).requires_grad_()
    w = torch.randn(C, kernel_size, dtype=torch.float64).requires_grad_()
    b = (torch.randn(C, dtype=torch.float64) + 2).requires_grad_()
    history = torch.randn(B, kernel_size - 1, C, dtype=torch.float64)
    h0 = torch.randn(B, C, dtype=torch.float64)
    want_s, _, want_last, want_conv = naive_dsn(x, w, b, 0.25, N, surrogate, history=history, initial_membrane=h0)
    state, outs = DSNState(h0, history), []
    with record_backends() as ran:
        for t in range(T):
            s, state = dsn_step(x[:, t], w, b, 0.25, N, surrogate, state=state)
            outs.append(s)
    assert ran == [("dsn_step", "torch")] * T
    got_s = torch.stack(outs, dim=1)
    assert torch.equal(got_s, want_s)
    torch.testing.assert_close(state.membrane, want_last, atol=1e-12, rtol=1e-12)
    assert torch.equal(state.conv, want_conv)
    grad = torch.randn(B, T, C, dtype=torch.float64)
    g1 = torch.autograd.grad((got_s * grad).sum() + state.membrane.sum(), [x, w, b])
    g2 = torch.autograd.grad((want_s * grad).sum() + want_last.sum(), [x, w, b])
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


def test_backends_are_named_alike_and_never_fall_back_silently():
    """DSN(backend=...) and ops.dsn take the same names; an explicit backend that cannot run is an error."""
    from spikelm.ops.dsn import BACKENDS

    assert BACKENDS == ("auto", "naive", "torch", "c", "triton")
    x = torch.randn(1, 6, 4)
    w, b = torch.randn(4, 4), torch.randn(4)
    for backend in ("naive", "torch", "c"):
        if backend == "c" and not c_backend.available():
            continue
        neuron = DSN(4, backend=backend)
        with record_backends() as ran:
            neuron(x)
            neuron.step(x[:, 0])
        assert ran == [("dsn", backend), ("dsn_step", "torch" if backend == "c" else backend)]
    with pytest.raises(ValueError, match="backend must be one of"):
        DSN(4, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' cannot run this call"):
        DSN(4, backend="triton")(x)
    with pytest.raises(ValueError, match="backend='c' cannot run this call: it does not return the membrane"):
        dsn(x, w, b, backend="c", output_membrane=True)
    with pytest.raises(ValueError, match="backend='c' cannot run this call: the C kernel has no step"):
        dsn_step(x[:, 0], w, b, backend="c")
    with pytest.raises(ValueError, match="backend='triton' cannot run this call"):
        dsn_step(x[:, 0], w, b, backend="triton")


def test_record_backends_collects_nested_and_only_inside():
    x = torch.randn(1, 5, 4)
    w, b = torch.randn(4, 4), torch.randn(4)
    with record_backends() as outer:
        dsn(x, w, b, backend="torch")
        with record_backends() as inner:
            dsn(x, w, b, backend="naive")
    dsn(x, w, b, backend="torch")
    assert outer == [("dsn", "torch"), ("dsn", "naive")] and inner == [("dsn", "naive")]


def test_op_bad_arguments():
    x = torch.randn(2, 5, 4)
    w, b = torch.randn(4, 4), torch.randn(4)
    with pytest.raises(ValueError, match=r"weight must have shape \[C=4, k >= 1\]"):
        dsn(x, torch.randn(3, 4), b)
    with pytest.raises(ValueError, match=r"bias must have shape \[C=4\]"):
        dsn(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        dsn(x, w, b, tau=0.0)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, C\]"):
        dsn(x[0], w, b)
    with pytest.raises(TypeError, match="DSNState"):
        dsn(x, w, b, initial_state=(torch.zeros(2, 4), torch.zeros(2, 3, 4)))
    with pytest.raises(ValueError, match="state shapes must be membrane"):
        dsn_step(x[:, 0], w, b, state=DSNState(torch.zeros(3, 4), None))


@pytest.mark.skipif(not c_backend.available(), reason="no C compiler")
@pytest.mark.parametrize("shape", [(1, 4, 0), (0, 4, 3), (2, 0, 3)])
def test_c_kernel_empty_shapes_forward_and_backward(shape):
    x = torch.zeros(shape, requires_grad=True)
    C = shape[2]
    w, b = torch.zeros(C, 4, requires_grad=True), torch.zeros(C, requires_grad=True)
    s = dsn(x, w, b, 0.25, 4, "atan", 1.0, backend="c").spikes
    s.sum().backward()
    assert s.shape == shape and x.grad.shape == shape and w.grad.shape == (C, 4)
