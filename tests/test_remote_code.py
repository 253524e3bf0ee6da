"""A saved SpikeLM folder loads with trust_remote_code=True where spikelm is not installed, and gives the same logits."""
import ast
import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoModelForCausalLM

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.data import train_bpe_tokenizer
from spikelm.models.remote_code import AUTO_MAP, bundle_sources, closure

TINY = dict(vocab_size=300, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, attention_window=6,
            ssm_expand=2, mlp_ratio=2, block_types=["ssm", "attention", "ssm", "ssm"])

# run in a subprocess: the import system refuses spikelm, as in a venv without it
HIDDEN = """
import importlib.abc, importlib.util, sys
class HideSpikeLM(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "spikelm" or name.startswith("spikelm."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, HideSpikeLM())
try:
    import spikelm  # noqa
    raise SystemExit("spikelm is still importable")
except ModuleNotFoundError:
    pass
"""


def save_tiny(folder):
    torch.manual_seed(0)
    model = SpikeLMForCausalLM(SpikeLMConfig(**TINY)).eval()
    tok = train_bpe_tokenizer(["the spiking neuron fires", "a model streams text"] * 20, 300)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def run_hidden(code: str, cwd, tmp_path) -> str:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", HIDDEN + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_folder_loads_without_spikelm_with_the_same_logits(tmp_path):
    folder = tmp_path / "model"
    model, tok = save_tiny(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    ids = tok(["the spiking neuron", "a model"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**ids).logits
        greedy = model.generate(**ids, max_new_tokens=6, do_sample=False)
    torch.save({"ids": dict(ids), "logits": ref, "greedy": greedy}, tmp_path / "ref.pt")
    out = run_hidden("""
        import sys, warnings, torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        warnings.simplefilter("error", RuntimeWarning)  # the C kernel must build from the embedded source
        config = AutoConfig.from_pretrained("model", trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained("model", trust_remote_code=True)
        ref = torch.load("ref.pt")
        ids = tok(["the spiking neuron", "a model"], return_tensors="pt", padding=True)
        assert torch.equal(ids["input_ids"], ref["ids"]["input_ids"])
        with torch.no_grad():
            diff = (model(**ids).logits - ref["logits"]).abs().max().item()
            greedy = model.generate(**ids, max_new_tokens=6, do_sample=False)
        kernel = next(m for n, m in sys.modules.items() if n.endswith("spikelm_ops_dsn_c_backend"))
        assert kernel.available(), kernel.unavailable_reason()
        # the event-driven linear's C++ kernel, built from the embedded sources, under the copy's own namespace
        op = next(m for n, m in sys.modules.items() if n.endswith("spikelm_ops_spike_linear"))
        model.set_sparse_inference("on")
        with torch.no_grad():
            sparse_diff = (model(**ids).logits - ref["logits"]).abs().max().item()
        assert op.op_kernel() == "c" and op.kernel_calls()["c"] > 0 and sparse_diff <= 1e-4, sparse_diff
        assert op.NAMESPACE != "spikelm"
        model.set_sparse_inference("off")
        model.save_pretrained("again")  # a remote-code model saves a folder that loads the same way
        again = AutoModelForCausalLM.from_pretrained("again", trust_remote_code=True).eval()
        with torch.no_grad():
            diff_again = (again(**ids).logits - ref["logits"]).abs().max().item()
        print(type(model).__module__, diff, bool(torch.equal(greedy, ref["greedy"])), diff_again)
    """, tmp_path, tmp_path)
    module, diff, same, diff_again = out.split()[-4:]
    assert module.startswith("transformers_modules.") and module.endswith("modeling_spikelm")
    assert float(diff) <= 1e-5 and same == "True" and float(diff_again) <= 1e-5


def test_installed_package_and_remote_copy_load_side_by_side(tmp_path, monkeypatch):
    """The folder's copy of the code imported next to the installed package (transformers itself prefers the
    registered local classes): its custom ops take their own namespace, and both give the same logits."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    _, _ = save_tiny(tmp_path / "model")
    remote_cls = get_class_from_dynamic_module(AUTO_MAP["AutoModelForCausalLM"], str(tmp_path / "model"))
    remote = remote_cls.from_pretrained(tmp_path / "model").eval()
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert remote_cls.__module__ != type(local).__module__ and isinstance(local, SpikeLMForCausalLM)
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, local(ids).logits, atol=1e-5, rtol=0)
        for model in (remote, local):  # both ops' C++ kernels: one library, registered under both namespaces
            model.set_sparse_inference("on")
        torch.testing.assert_close(remote(ids[:, :1]).logits, local(ids[:, :1]).logits, atol=1e-5, rtol=0)


def test_saved_bundle_is_the_package_code(tmp_path):
    """The folder holds exactly what the package generates now, and every module the model imports."""
    save_tiny(tmp_path)
    bundle = bundle_sources()
    for name, source in bundle.items():
        assert (tmp_path / name).read_text(encoding="utf-8") == source, name
    mods = closure()
    for needed in ("spikelm.ops.dsn.c_backend", "spikelm.ops.csrc_sources", "spikelm.neurons.dsn", "spikelm.models.cache"):
        assert needed in mods
    assert not any(m.startswith(("spikelm.training", "spikelm.data", "spikelm.eval", "spikelm.serving")) for m in mods)
    for name, source in bundle.items():  # no import of the package survives the rewrite: only flat siblings
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1) and not (node.module or "").startswith("spikelm."), (name, node.module)
                if node.level == 1:
                    assert node.module is None or f"{node.module}.py" in bundle, (name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "spikelm" for a in node.names), name
