"""The event-driven linear op (ops/spike_linear.py, csrc/spike_linear*.c*), SpikeLinear and sparse decoding.

The op against dense F.linear (float32 rounding only) and the float64 reference, over empty and full
spike vectors, every spike value, odd sizes, batch > 1, float32/bfloat16 weights; which backend ran
(the C++ kernel, the torch kernel, which the op gets where the C++ one does not build, dense above
the crossover); the kernels' weight layouts; torch.compile without a graph break; and greedy decoding
of a briefly trained model (realistically sparse spikes) giving the same tokens sparse and dense.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spikelm import SpikeLMConfig, SpikeLMForCausalLM, StreamingGenerator
from spikelm.layers import SpikeLinear, set_sparse_mode, sparse_mode_as
from spikelm.layers.spike_linear import AUTO_MAX_ROWS, crossover_density
from spikelm.models import CACHE_NAME
from spikelm.ops import record_backends
from spikelm.ops.spike_linear import (_LAYOUTS, c_kernel_available, kernel_calls, layouts_nbytes,
                                      naive_spike_linear, op_kernel, quantize_int8, spike_linear,
                                      torch_spike_linear, transposed_weight)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_spikes(shape, density: float, max_spike: int = 4, gen=None) -> torch.Tensor:
    fired = torch.rand(shape, generator=gen) < density
    return (torch.randint(1, max_spike + 1, shape, generator=gen) * fired).float()


def backend_of(fn):
    """(result of fn(), the backends that ran during it)."""
    with record_backends() as ran:
        out = fn()
    return out, {backend for op, backend in ran if op == "spike_linear"}


def check_close(got, spikes, weight, bias=None, rtol=1e-5):
    """got agrees with the float64 reference to float32 rounding (relative to the sum of |terms|)."""
    want = naive_spike_linear(spikes, weight, bias)
    scale = naive_spike_linear(spikes.abs(), weight.abs(), None if bias is None else bias.abs()) + 1e-30
    err = ((got.double() - want).abs() / scale).max().item() if want.numel() else 0.0
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


# -- the op ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_f,in_f", [(1, 1), (7, 5), (33, 129), (300, 257), (1029, 67)])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_op_matches_dense_and_reference(out_f, in_f, rows, density):
    gen = torch.Generator().manual_seed(out_f * 1000 + in_f + rows)
    w = torch.randn(out_f, in_f, generator=gen)
    b = torch.randn(out_f, generator=gen)
    s = random_spikes((rows, in_f), density, gen=gen)
    got, ran = backend_of(lambda: spike_linear(s, w, b))
    assert ran == {"c" if c_kernel_available() else "torch"}
    assert got.shape == (rows, out_f) and got.dtype == torch.float32
    check_close(got, s, w, b)
    torch.testing.assert_close(got, F.linear(s, w, b), rtol=1e-5, atol=1e-4)
    check_close(spike_linear(s, w), s, w)  # without a bias


def test_empty_and_full_spike_vectors():
    w, b = torch.randn(70, 45), torch.randn(70)
    zeros = torch.zeros(2, 45)
    assert torch.equal(spike_linear(zeros, w, b), b.expand(2, 70))  # nothing fired: the bias, exactly
    assert torch.equal(spike_linear(zeros, w), torch.zeros(2, 70))
    full = torch.full((2, 45), 3.0)
    check_close(spike_linear(full, w, b), full, w, b)
    assert torch.equal(spike_linear(torch.zeros(0, 45), w, b), torch.zeros(0, 70))  # no rows


@pytest.mark.parametrize("max_spike", [1, 4, 15])
def test_every_spike_value(max_spike):
    """Each value 0..N on every input (cycling), per row offset: the count multiplies its weight column."""
    in_f = 3 * (max_spike + 1) + 1
    w = torch.randn(19, in_f)
    s = torch.stack([(torch.arange(in_f) + r) % (max_spike + 1) for r in range(max_spike + 1)]).float()
    got = spike_linear(s, w)
    check_close(got, s, w)
    one_hot = torch.zeros(max_spike + 1, in_f)
    one_hot[:, 1] = torch.arange(max_spike + 1).float()  # value v on input 1 alone: exactly v x column 1
    assert torch.equal(spike_linear(one_hot, w), one_hot[:, 1:2] * w[:, 1])


def test_batch_rows_are_independent_and_leading_dims_kept():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(130, 96, generator=gen)
    s = random_spikes((3, 5, 96), 0.2, gen=gen)
    s[1, 2] = 0  # a silent row among firing ones
    s[2, 4] = 4  # a row where everything fired
    got = spike_linear(s, w)
    assert got.shape == (3, 5, 130)
    for i in range(3):
        for t in range(5):
            torch.testing.assert_close(got[i, t], spike_linear(s[i, t], w), rtol=1e-5, atol=1e-5)
    check_close(got, s, w)


def test_bfloat16_weights():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(257, 131, generator=gen).to(torch.bfloat16)
    s = random_spikes((2, 131), 0.3, gen=gen)
    got, ran = backend_of(lambda: spike_linear(s, w))
    assert ran == {"c" if c_kernel_available() else "torch"}
    assert got.dtype == torch.float32  # promote(float32 spikes, bfloat16 weights)
    check_close(got, s, w.float())  # the weights exactly as stored, accumulated in float32
    b16 = torch.randn(257, generator=gen).to(torch.bfloat16)
    got16 = spike_linear(s.to(torch.bfloat16), w, b16)
    assert got16.dtype == torch.bfloat16
    check_close(got16, s, w.float(), b16.float(), rtol=4e-3)  # the bfloat16 output's rounding (2^-9)


def test_float16_weights_dense_in_the_c_kernel_sparse_in_the_torch_one():
    w = torch.randn(40, 24).half()
    s = random_spikes((2, 24), 0.4)
    got, ran = backend_of(lambda: spike_linear(s.half(), w))
    assert ran == {"dense" if c_kernel_available() else "torch"} and got.dtype == torch.float16
    check_close(got, s, w.float(), rtol=2e-3)
    got, ran = backend_of(lambda: torch_spike_linear(s.half(), w, None, 1.0))
    assert ran == {"torch"} and got.dtype == torch.float16
    check_close(got, s, w.float(), rtol=2e-3)


def test_too_dense_runs_dense():
    w = torch.randn(50, 40)
    s = torch.zeros(2, 40)
    s[0, :10] = 1.0  # 10 inputs fired in row 0, 5 more in row 1 (15 in any row)
    s[1, 10:15] = 2.0
    _, ran = backend_of(lambda: spike_linear(s, w, max_density=15 / 40))
    assert ran == {"c" if c_kernel_available() else "torch"}
    got, ran = backend_of(lambda: spike_linear(s, w, max_density=14 / 40))
    assert ran == {"dense"}
    assert torch.equal(got, F.linear(s, w))


@pytest.mark.skipif(not c_kernel_available(), reason="the C++ kernel does not build here")
def test_c_kernel_layouts_follow_the_weight():
    """The C++ kernel's [in, out] copy: made on the first sparse call, remade after an in-place change (same
    bytes held), remade for a new dtype (Module.to keeps the Parameter), dropped with the weight; none for a
    call that runs dense."""
    gc.collect()
    base = layouts_nbytes()
    w = torch.randn(30, 20)
    s = random_spikes((1, 20), 0.5)
    spike_linear(s, w, max_density=0.0)  # too dense for the walk: no layout made
    assert layouts_nbytes() == base
    check_close(spike_linear(s, w), s, w)
    assert layouts_nbytes() == base + 30 * 20 * 4
    with torch.no_grad():
        w.mul_(-2.0)
    check_close(spike_linear(s, w), s, w)
    spike_linear(s, w, int8=True)
    assert layouts_nbytes() == base + 30 * 20 * 4 + 30 * 20 + 30 * 4  # + int8 weights and a scale per output
    layer = torch.nn.Linear(20, 30, bias=False)
    spike_linear(s, layer.weight.detach())
    with torch.no_grad():
        check_close(spike_linear(s, layer.weight), s, layer.weight)
        layer.to(torch.bfloat16)  # the same Parameter, same version, now bfloat16 data
        check_close(spike_linear(s, layer.weight), s, layer.weight.float())
    del w, layer
    gc.collect()
    assert layouts_nbytes() == base


def test_torch_kernel_layout_follows_the_weight():
    """The torch kernel's [in, out] copy is made once, remade after an in-place change, dropped with the weight."""
    w = torch.randn(30, 20)
    s = random_spikes((1, 20), 0.5)
    torch_spike_linear(s, w, None, 1.0)
    wt = transposed_weight(w)
    assert wt.shape == (20, 30) and wt.is_contiguous() and transposed_weight(w) is wt
    with torch.no_grad():
        w.mul_(-2.0)
    check_close(torch_spike_linear(s, w, None, 1.0), s, w)
    assert transposed_weight(w) is not wt
    key = (id(w), "transposed")
    del w, wt
    assert key not in _LAYOUTS


@pytest.mark.parametrize("rows", [1, 3])
def test_int8_weights_integer_accumulates(rows):
    """int8: exactly scale x (the integer sum of spike x int8 weight) + bias, and close to the float product."""
    gen = torch.Generator().manual_seed(4)
    w, b = torch.randn(301, 77, generator=gen), torch.randn(301, generator=gen)
    w[5] = 0.0  # a row of zeros (scale 1)
    s = random_spikes((rows, 77), 0.3, max_spike=15, gen=gen)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (77, 301) and q.abs().max() == 127 and scale[5] == 1
    torch.testing.assert_close(q.t().float() * scale[:, None], w, rtol=0, atol=float(scale.max()) / 2 + 1e-7)
    got, ran = backend_of(lambda: spike_linear(s, w, b, int8=True))
    assert ran == {"c_int8" if c_kernel_available() else "torch_int8"}
    exact = (s.double() @ q.double()) * scale.double() + b.double()  # integer sums: exact in float64
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-5)
    check_close(got, s, q.t().float() * scale[:, None], b)
    assert (got - F.linear(s, w, b)).abs().max() < 0.05 * F.linear(s, w, b).abs().max()
    s_half = s.clone()
    s_half[0, 0] = 0.5  # not a spike count: the float dense product runs instead
    got, ran = backend_of(lambda: spike_linear(s_half, w, b, int8=True))
    assert ran == {"dense"} and torch.equal(got, F.linear(s_half, w, b))


def test_int8_torch_kernel():
    w = torch.randn(40, 24)
    s = random_spikes((2, 24), 0.5)
    q, scale = quantize_int8(w)
    got, ran = backend_of(lambda: torch_spike_linear(s, w, None, 1.0, True))
    assert ran == {"torch_int8"}
    torch.testing.assert_close(got.double(), (s.double() @ q.double()) * scale.double(), rtol=1e-6, atol=1e-5)


def test_errors_name_the_problem():
    w = torch.randn(8, 6)
    with pytest.raises(ValueError, match="do not fit"):
        spike_linear(torch.zeros(2, 5), w)
    with pytest.raises(ValueError, match="do not fit"):
        spike_linear(torch.zeros(2, 6), w, torch.zeros(7))
    with pytest.raises(ValueError, match="inference op"):
        spike_linear(torch.zeros(2, 6), w.requires_grad_())


def test_torch_kernel_same_results():
    """The kernel where the C++ one cannot be built (no compiler, SPIKELM_CPU_KERNEL=0): same results."""
    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(65, 33, generator=gen), torch.randn(65, generator=gen)
    s = random_spikes((3, 33), 0.3, gen=gen)
    for dtype in (torch.float32, torch.bfloat16):
        got, ran = backend_of(lambda: torch_spike_linear(s, w.to(dtype), b.to(dtype), 1.0))
        assert ran == {"torch"}
        check_close(got, s, w.to(dtype).float(), b.to(dtype).float())
        torch.testing.assert_close(got, spike_linear(s, w.to(dtype), b.to(dtype)), rtol=1e-5, atol=1e-4)
    got, ran = backend_of(lambda: torch_spike_linear(s, w, None, 0.1))
    assert ran == {"dense"} and torch.equal(got, F.linear(s, w))


def test_the_op_called_directly_first_registers_its_kernel():
    """torch.ops.spikelm.spike_linear before any spike_linear() call (torch.export, opcheck): it finds a kernel."""
    code = ("import sys, torch, torch.nn.functional as F\n"
            "import spikelm.ops\n"
            "sl = sys.modules['spikelm.ops.spike_linear']\n"
            "assert sl._KERNEL is None\n"
            "w, s = torch.randn(24, 16), (torch.rand(2, 16) < 0.3).float() * 2\n"
            "torch.testing.assert_close(torch.ops.spikelm.spike_linear.default(s, w, None, 1.0, False), F.linear(s, w),"
            " rtol=1e-5, atol=1e-5)\n"
            "print(sl._KERNEL)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["c" if c_kernel_available() else "torch"]


def test_auto_is_dense_with_only_the_torch_kernel(monkeypatch):
    """The crossover is the C++ kernel's: with the (slower) torch kernel "auto" never takes the sparse path."""
    import spikelm.layers.spike_linear as layer_module

    big = SpikeLinear(768, 3072, bias=False)
    monkeypatch.setattr(layer_module, "c_kernel_runs", lambda: False)
    with torch.no_grad():
        assert backend_of(lambda: big(random_spikes((1, 1, 768), 0.1)))[1] == set()


def test_without_the_c_kernel_the_op_gets_the_torch_kernel():
    """SPIKELM_CPU_KERNEL=0 (as where nothing compiles): the op registers the torch kernel, eager and compiled."""
    code = ("import torch, torch.nn.functional as F\n"
            "from spikelm.ops.spike_linear import spike_linear, op_kernel, kernel_calls\n"
            "w, s = torch.randn(24, 16), (torch.rand(2, 16) < 0.3).float() * 2\n"
            "f = torch.compile(lambda x: spike_linear(x, w) * 2.0, fullgraph=True, backend='aot_eager')\n"
            "with torch.no_grad(): y, z = spike_linear(s, w), f(s)\n"
            "torch.testing.assert_close(y, F.linear(s, w), rtol=1e-5, atol=1e-5)\n"
            "torch.testing.assert_close(z, 2 * F.linear(s, w), rtol=1e-5, atol=1e-5)\n"
            "print(op_kernel(), kernel_calls()['torch'])\n")
    env = dict(os.environ, SPIKELM_CPU_KERNEL="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["torch", "2"]


def test_op_registration_and_compile_without_graph_break():
    w = torch.randn(24, 16)
    s = random_spikes((2, 16), 0.3)
    torch.library.opcheck(torch.ops.spikelm.spike_linear.default, (s, w, None, 1.0, False))
    torch.library.opcheck(torch.ops.spikelm.spike_linear.default, (s, w, None, 1.0, True))
    torch._dynamo.reset()
    layer = SpikeLinear(16, 24).eval()
    set_sparse_mode(layer, "on")
    compiled = torch.compile(lambda x: layer(x) * 2.0, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        before = kernel_calls()[op_kernel()]
        got = compiled(s)
    assert kernel_calls()[op_kernel()] == before + 1  # the graph ran the op's kernel
    torch.testing.assert_close(got, F.linear(s, layer.weight, layer.bias) * 2.0, rtol=1e-5, atol=1e-5)


# -- the layer ---------------------------------------------------------------------------------------
def test_spike_linear_layer_is_an_nn_linear():
    dense = torch.nn.Linear(12, 9)
    layer = SpikeLinear(12, 9)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == set(dense.state_dict())
    layer.load_state_dict(dense.state_dict())
    s = random_spikes((4, 12), 0.5)
    with torch.no_grad():
        for mode in ("off", "on", "auto"):
            set_sparse_mode(layer, mode)
            torch.testing.assert_close(layer(s), dense(s), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'auto', 'on', 'off'"):
        set_sparse_mode(layer, "sparse")
    with pytest.raises(ValueError, match="int8 must be True or False"):
        set_sparse_mode(layer, "on", int8="yes")


def test_layer_dispatch():
    """Sparse only in inference on CPU; "auto" only for few rows and layers where it can pay."""
    big = SpikeLinear(768, 3072, bias=False)
    s = random_spikes((1, 1, 768), 0.1)
    assert crossover_density(768, 3072) > 0.1 and crossover_density(4, 4) == 0.0
    with torch.no_grad():
        assert backend_of(lambda: big(s))[1] == {"c" if c_kernel_available() else "torch"}  # auto
        assert backend_of(lambda: big(random_spikes((1, AUTO_MAX_ROWS + 1, 768), 0.1)))[1] == set()  # prefill
        set_sparse_mode(big, "off")
        assert backend_of(lambda: big(s))[1] == set()
        set_sparse_mode(big, "on")
        assert backend_of(lambda: big(random_spikes((1, 40, 768), 1.0)))[1] == {"c" if c_kernel_available()
                                                                                else "torch"}
        small = SpikeLinear(4, 4)  # too small for the sparse call's fixed cost: auto stays dense
        assert backend_of(lambda: small(torch.ones(1, 4)))[1] == set()
    x = s.clone().requires_grad_()
    y, ran = backend_of(lambda: big(x))  # a gradient is wanted: dense, whatever the mode
    assert ran == set()
    y.sum().backward()
    assert big.weight.grad is not None and x.grad is not None


def test_sparse_mode_as_restores_each_layers_mode():
    a, b = SpikeLinear(768, 3072, bias=False), SpikeLinear(768, 3072, bias=False)
    model = torch.nn.Sequential(a, b)
    set_sparse_mode(a, "on", int8=True)
    s = random_spikes((1, 1, 768), 0.1)
    with torch.no_grad(), sparse_mode_as(model, "off"):
        assert (a.sparse_mode, b.sparse_mode) == ("off", "off")
        assert backend_of(lambda: (a(s), b(s)))[1] == set()
        set_sparse_mode(model, "auto", int8=True)  # changed inside the block: undone on leaving it
    assert (a.sparse_mode, a.sparse_int8, b.sparse_mode, b.sparse_int8) == ("on", True, "auto", False)
    with pytest.raises(RuntimeError, match="inside"), sparse_mode_as(model, "off"):
        raise RuntimeError("inside")
    assert (a.sparse_mode, b.sparse_mode) == ("on", "auto")  # restored after an error too
    with pytest.raises(ValueError, match="sparse inference mode"), sparse_mode_as(model, "sometimes"):
        pass
    assert (a.sparse_mode, b.sparse_mode) == ("on", "auto")  # a rejected mode changes nothing


def test_training_sample_decodes_dense():
    """The sample at the end of training takes the dense products (a few tokens do not repay building the
    sparse op's C++ kernel) and leaves the model's mode as it was."""
    from spikelm.training.trainer import sample_text

    class Tokens:
        pad_token_id, eos_token_id = 0, 0

        def __call__(self, text, return_tensors, add_special_tokens):
            return type("Encoded", (), {"input_ids": torch.tensor([[1, 2, 3]])})()

        def decode(self, ids, skip_special_tokens):
            return " ".join(map(str, ids.tolist()))

    torch.manual_seed(0)
    model = SpikeLMForCausalLM(SpikeLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                             block_types=["ssm", "ssm"]))
    model.set_sparse_inference("on")
    with record_backends() as ran:
        text = sample_text(model, Tokens(), "x", 5, seed=0)
    assert len(text.split()) == 8 and not any(name == "spike_linear" for name, _ in ran)
    assert {m.sparse_mode for m in model.modules() if isinstance(m, SpikeLinear)} == {"on"}


def test_density_monitor_counts_by_hand():
    from spikelm.eval.sparsity import SpikeDensityMonitor

    model = torch.nn.Sequential(SpikeLinear(8, 5, bias=False), torch.nn.ReLU(), SpikeLinear(5, 100, bias=False))
    model[0].crossover, model[2].crossover = 0.0, 0.5  # the first never sparse in "auto", the second up to 2 of 5
    s = torch.tensor([[[1.0, 0, 0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]])
    with torch.no_grad(), SpikeDensityMonitor(model) as monitor:
        model[0](s)
        model[2](torch.tensor([[1.0, 0, 0, 0, 3], [1, 1, 1, 0, 0]]))
    r = monitor.report()
    first, second = r["layers"]["0"], r["layers"]["2"]
    assert first["density"] == 10 / 24 and first["dense_bytes_per_token"] == 8 * 5 * 4
    assert first["sparse_bytes_per_token"] == 10 / 3 * 5 * 4 and first["auto_bytes_per_token"] == 8 * 5 * 4
    assert second["density"] == 5 / 10 and second["auto_sparse_fraction"] == 0.5
    assert second["auto_bytes_per_token"] == (2 * 100 * 4 + 5 * 100 * 4) / 2
    # int8: a byte per fired weight plus a float32 scale per output; the dense fallback in the weights' dtype
    assert first["int8_sparse_bytes_per_token"] == 10 / 3 * 5 + 5 * 4
    assert first["int8_auto_bytes_per_token"] == 8 * 5 * 4
    assert second["int8_auto_bytes_per_token"] == ((2 * 100 + 100 * 4) + 5 * 100 * 4) / 2
    assert second["int8_sparse_bytes_per_token"] == 5 / 2 * 100 + 100 * 4
    assert r["total"]["int8_sparse_bytes_per_token"] == pytest.approx(first["int8_sparse_bytes_per_token"] + 650)
    assert r["total"]["dense_bytes_per_token"] == 8 * 5 * 4 + 5 * 100 * 4
    assert r["mean_density"] == (10 / 24 * 8 + 0.5 * 5) / 13


# -- sparse decoding of a trained model ------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_model():
    """A small SpikeLM (an SSM and an attention block) trained briefly on bytes of the shipped text, so its
    spikes are as sparse as training makes them (not a random model's)."""
    torch.manual_seed(0)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = torch.tensor(list((ROOT / "data" / "paradise_lost_train.txt").read_bytes()[:100_000]), dtype=torch.long)
    cfg = SpikeLMConfig(vocab_size=256, hidden_size=48, num_hidden_layers=2, block_types=["ssm", "attention"],
                        num_attention_heads=2, attention_window=16, max_spike=4, eos_token_id=None)
    model = SpikeLMForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, data.numel() - 49, (8,), generator=gen)
        x = torch.stack([data[s:s + 48] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(n_threads)
    model.eval()
    return model, data, loss.item()


def greedy(model, prompt, n):
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, tokens = out[CACHE_NAME], []
        for _ in range(n):
            tokens.append(out.logits[:, -1:].argmax(-1))
            out = model(tokens[-1], use_cache=True, **{CACHE_NAME: cache})
            cache = out[CACHE_NAME]
    return torch.cat(tokens, 1)


def test_greedy_decoding_same_tokens_sparse_and_dense(trained_model):
    """Two prompts decoded together (batch 2) for 200 steps: the same 400 tokens with the sparse op as dense."""
    model, data, loss = trained_model
    assert loss < 3.2, f"the fixture model did not train (loss {loss:.2f})"
    from spikelm.eval.sparsity import SpikeDensityMonitor

    prompts = torch.stack([data[5000:5016], data[20000:20016]])
    with SpikeDensityMonitor(model) as monitor:
        model.set_sparse_inference("off")
        dense, ran = backend_of(lambda: greedy(model, prompts, 200))
    assert ran == set()
    density = monitor.mean_density()
    assert 0.02 < density < 0.6, density  # trained spikes: neither silent nor saturated
    model.set_sparse_inference("on")
    sparse, ran = backend_of(lambda: greedy(model, prompts, 200))
    assert ran == {"c" if c_kernel_available() else "torch"}
    assert torch.equal(sparse, dense)
    assert all(len(set(row.tolist())) >= 3 for row in dense)  # a continuation, not one repeated token
    prompt = prompts[:1]
    with torch.no_grad():  # generate() and the streaming generator follow the mode too
        got, ran = backend_of(lambda: model.generate(prompt, max_new_tokens=30, do_sample=False))
    assert ran == {"c" if c_kernel_available() else "torch"}
    assert torch.equal(got[:, 16:], dense[:1, :30])
    stream = StreamingGenerator(model, temperature=0, stop_at_eos=False)
    stream.feed_ids(prompt[0])
    tokens, ran = backend_of(lambda: list(stream.generate(30)))
    assert ran and tokens == dense[0, :30].tolist()
    model.set_sparse_inference("auto")  # the default
    assert torch.equal(greedy(model, prompts, 30), dense[:, :30])
    model.set_sparse_inference("off")
    stream.reset()
    stream.feed_ids(prompt[0])
    assert backend_of(lambda: list(stream.generate(5)))[1] == set()
    with pytest.raises(ValueError, match="sparse inference mode"):
        model.set_sparse_inference("fast")


def test_int8_weights_barely_change_the_loss(trained_model):
    model, data, _ = trained_model
    text = data[None, 30000:30512]
    with torch.no_grad():
        model.set_sparse_inference("off")
        dense = model(text, labels=text).loss.item()
        model.set_sparse_inference("on", int8=True)  # "on": the parallel forward takes the int8 product too
        int8, ran = backend_of(lambda: model(text, labels=text).loss.item())
    model.set_sparse_inference("auto")
    assert ran == {"c_int8" if c_kernel_available() else "torch_int8"}
    assert abs(int8 - dense) < 0.02 * dense, (int8, dense)
