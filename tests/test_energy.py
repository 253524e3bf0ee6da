"""Energy accounting from what modules declare (spikelm.layers.op_counts): the same numbers as before, and no
module left out silently."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.eval import EnergyCounter
from spikelm.layers import NeuronLayer, OpCount, RMSNorm, SequenceContext
from spikelm.neurons import DSN

# Reports of the counter as it was before modules declared their own counts (it matched module types and
# names), on these configs and inputs: every number that does not depend on the spikes the random model
# fires. The spike-dependent ones (the spiking network's linear accumulates) are checked against the spikes.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PINNED = json.loads((Path(__file__).parent / "data" / "energy_pinned.json").read_text())
CASES = sorted({key.split("|")[0] for key in PINNED})


def _model(case: dict):
    torch.manual_seed(0)
    cfg = SpikeLMConfig(vocab_size=300, hidden_size=32, num_hidden_layers=len(case["block_types"]),
                        num_attention_heads=4, ssm_expand=2, mlp_ratio=2, psn_T=64, pad_token_id=0, eos_token_id=1,
                        config_version=1, **case)  # the pinned reports are of version 1's binary SSM gate
    return SpikeLMForCausalLM(cfg).eval()


def _inputs(case: dict) -> dict:
    ids = torch.randint(2, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    runs = {"plain": dict(input_ids=ids),
            "packed": dict(input_ids=ids[:1], position_ids=torch.tensor([list(range(7)) + list(range(13))]))}
    if case["neuron_type"] != "psn":
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[1, :5] = 0
        runs["padded"] = dict(input_ids=ids, attention_mask=mask)
    return runs


@pytest.mark.parametrize("gate, mac, ac", [("binary", 0.0, 1.0), ("integer", 1.0, 0.0), ("none", None, None)])
def test_ssm_gate_counts_a_select_a_product_or_nothing(gate, mac, ac):
    """The gate y * g per element of the SSM core: binary g is a select (1 AC), integer g a product (1 MAC);
    without a gate nothing is counted."""
    torch.manual_seed(0)
    cfg = SpikeLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, block_types=["ssm"], ssm_expand=2,
                        mlp_ratio=2, ssm_gate=gate)
    model = SpikeLMForCausalLM(cfg).eval()
    with torch.inference_mode(), EnergyCounter(model) as counter:
        model(torch.randint(0, 50, (1, 8)), use_cache=False)
    cats = counter.report(tokens=8)["networks"]["spiking"]["by_category"]
    if gate == "none":
        assert "gate" not in cats
    else:
        inner = 2 * 16
        assert cats["gate"]["mac_per_token"] == mac * inner and cats["gate"]["ac_per_token"] == ac * inner


@pytest.mark.parametrize("case_key", CASES)
def test_energy_report_keeps_its_numbers(case_key):
    case = json.loads(case_key)
    model = _model(case)
    for run, kwargs in _inputs(case).items():
        want = PINNED[f"{case_key}|{run}"]
        fed = []  # the spikes each Linear reads x its fan-out: the accumulates of the spiking network
        hooks = [m.register_forward_hook(lambda mod, args, out: fed.append(float(args[0].double().sum()) * mod.out_features))
                 for m in model.modules() if isinstance(m, nn.Linear)]
        try:
            with torch.inference_mode(), EnergyCounter(model) as counter:
                model(**kwargs, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        tokens = int(kwargs["input_ids"].numel())
        got = counter.report(tokens=tokens)
        assert got["dense_fed_linears"] == want["dense_fed_linears"]
        assert len(got["spike_fed_linears"]) == want["n_spike_fed_linears"]
        for net in ("spiking", "dense"):
            n = got["networks"][net]
            assert set(n["by_category"]) == set(want[net]["category"]) and set(n["by_layer"]) == set(want[net]["layer"])
            for cat, (mac, ac) in want[net]["category"].items():
                assert n["by_category"][cat]["mac_per_token"] == mac, (run, net, cat)
                assert n["by_category"][cat]["ac_per_token"] == (ac if ac is not None else sum(fed) / tokens), (run, net, cat)
            for layer, (mac, ac) in want[net]["layer"].items():
                assert n["by_layer"][layer]["mac_per_token"] == mac, (run, net, layer)
                if ac is not None:
                    assert n["by_layer"][layer]["ac_per_token"] == ac, (run, net, layer)


class _Mystery(nn.Module):  # arithmetic the counter cannot know about
    def forward(self, x):
        return x * 2


class _UndeclaredNeuron(nn.Module):
    max_spike = 1

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x, state=None, return_state=False):
        return (x > 0).to(x.dtype)


def test_a_module_that_declares_nothing_is_an_error():
    model = nn.Sequential(nn.Linear(3, 3), _Mystery())
    with pytest.raises(TypeError, match=r"declare no operation counts.*1 \(_Mystery\)"):
        with EnergyCounter(model):
            pass
    layer = NeuronLayer(4, dict(neuron_type="dsn"))
    layer.neuron = _UndeclaredNeuron(4)
    with pytest.raises(TypeError, match=r"neuron \(_UndeclaredNeuron\)"):
        EnergyCounter(nn.Sequential(layer)).__enter__()
    stray = nn.Sequential(DSN(4))  # a neuron outside a NeuronLayer: nobody counts it
    with pytest.raises(TypeError, match=r"0 \(DSN\)"):
        EnergyCounter(stray).__enter__()


def test_declared_counts_and_linear_subclasses_are_counted():
    class SpikeLinear(nn.Linear):  # a spike-fed linear with its own forward: still a Linear to the counter
        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    class Gate(nn.Module):
        def op_counts(self, inputs):
            return {"gate": OpCount(ac=inputs[0].numel(), dense_mac=inputs[0].numel(), dense_ac=0.0)}

        def forward(self, x):
            return x * (x > 1)

    model = nn.Sequential(SpikeLinear(3, 5, bias=False), Gate(), RMSNorm(5))
    with EnergyCounter(model, mac_pj=1.0, ac_pj=0.5) as counter:
        model(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 4.0]]))  # 7 spikes -> 7 x 5 accumulates
    r = counter.report(tokens=2)
    assert r["spike_fed_linears"] == ["0"]
    spiking, dense = r["networks"]["spiking"], r["networks"]["dense"]
    assert spiking["by_category"]["norm"]["mac_per_token"] == 2 * 5  # a norm outside a NeuronLayer counts itself
    assert spiking["by_category"]["linear"]["ac_per_token"] == 7 * 5 / 2
    assert spiking["by_category"]["gate"] == {"mac_per_token": 0.0, "ac_per_token": 5.0, "energy_pj_per_token": 2.5}
    assert dense["by_category"]["gate"] == {"mac_per_token": 5.0, "ac_per_token": 0.0, "energy_pj_per_token": 5.0}
    assert dense["by_category"]["linear"]["mac_per_token"] == 15


def test_neuron_layer_counts_its_neuron_at_the_steps_positions():
    """PSN's MACs grow with the position (t + 1 taps up to T); the others are constant per step."""
    ctx = SequenceContext(valid=None, positions=torch.arange(6)[None].expand(2, 6))
    x = torch.randn(2, 6, 4)
    for neuron_type, per_step in [("dsn", [8] * 6), ("lif", [3] * 6), ("sliding_psn", [4] * 6),
                                  ("psn", [1, 2, 3, 4, 4, 4])]:
        layer = NeuronLayer(4, dict(neuron_type=neuron_type, psn_T=4))
        counts = layer.op_counts((x, ctx))
        assert counts["neuron"].mac == 2 * 4 * sum(per_step), neuron_type
        assert counts["norm"].mac == 2 * x.numel()
