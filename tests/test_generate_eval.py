"""Streaming generation, evaluation (perplexity parallel == streaming, by position), spiking analysis, CLIs."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from spikelm import SpikeLMConfig, SpikeLMForCausalLM, StreamingGenerator
from spikelm.data import train_bpe_tokenizer
from spikelm.eval import (EnergyCounter, evaluate_by_position, perplexity, spiking_analysis, split_windows, token_nll,
                          unfolding_check)
from spikelm.models.streaming import SamplingParams, process_logits, sample_token

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # generate.py and evaluate.py live at the repository root
TEXT = ["the spiking neuron fires when its membrane crosses the threshold. " * 3,
        "a language model predicts the next token from the ones before it. " * 3] * 20
SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, attention_window=6, ssm_expand=2, mlp_ratio=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXT, vocab_size=300)


def make_model(tokenizer, **overrides):
    torch.manual_seed(0)
    cfg = SpikeLMConfig(**{**SMALL, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                           "pad_token_id": tokenizer.pad_token_id, **overrides})
    return SpikeLMForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny_model")
    make_model(tokenizer).save_pretrained(d)
    tokenizer.save_pretrained(d)
    (d / "run_config.json").write_text(json.dumps({"identity": {"block_size": 16}}))  # as train.py writes it
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "text.txt"
    f.write_text(" ".join(TEXT[:4]) * 4)
    return f


# -- perplexity: parallel == streaming -------------------------------------------------------------
@pytest.mark.parametrize("block_types", [["ssm", "attention", "ssm", "attention"], ["ssm"] * 4])
def test_streaming_perplexity_equals_parallel(tokenizer, block_types):
    model = make_model(tokenizer, block_types=block_types)
    ids = torch.randint(0, len(tokenizer), (90,))
    parallel = token_nll(model, ids, "parallel")
    streaming = token_nll(model, ids, "streaming")  # token by token through the serial step
    chunked = token_nll(model, ids, "parallel", chunk_size=13)  # chunks continuing the cache
    assert parallel.shape == (89,)
    torch.testing.assert_close(streaming, parallel, atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked, parallel, atol=1e-4, rtol=0)
    assert abs(perplexity(streaming) / perplexity(parallel) - 1) < 1e-6
    # the reference: the model's own loss
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss
    assert abs(float(parallel.mean()) - float(loss)) < 1e-5


def test_perplexity_by_position_past_training_length(tokenizer):
    model = make_model(tokenizer)
    windows = split_windows(torch.randint(0, len(tokenizer), (2 * 65 + 7,)), 65)
    assert windows.shape == (2, 65)
    overlapping = split_windows(torch.arange(100), 30, stride=20)
    assert overlapping.shape == (4, 30) and overlapping[1, 0] == 20 and overlapping[3, -1] == 89
    r = evaluate_by_position(model, windows, ("parallel", "streaming"), bucket_size=16,
                             chunk_size={"streaming": 4}, train_len=8)
    assert r["agreement"]["ppl_rel_diff"] < 1e-6
    buckets = r["modes"]["parallel"]["buckets"]
    assert [b["start"] for b in buckets] == [0, 16, 32, 48] and buckets[-1]["end"] == 64
    assert sum(b["tokens"] for b in buckets) == 2 * 64
    assert r["modes"]["streaming"]["length_multiple"] == 8.0


def test_psn_model_parallel_only(tokenizer):
    model = make_model(tokenizer, neuron_type="psn", psn_T=64)
    ids = torch.randint(0, len(tokenizer), (20,))
    assert torch.isfinite(token_nll(model, ids)).all()
    with pytest.raises(ValueError, match="PSN"):
        token_nll(model, ids, "streaming")
    with pytest.raises(ValueError, match="PSN"):
        StreamingGenerator(model, tokenizer)


# -- StreamingGenerator ----------------------------------------------------------------------------
def test_greedy_stream_matches_generate(tokenizer):
    model = make_model(tokenizer)
    gen = StreamingGenerator(model, tokenizer, temperature=0, stop_at_eos=False, chunk_size=3)
    gen.feed("the spiking neuron")  # fed in chunks of 3 through the cache
    got = list(gen.generate(12))
    one = tokenizer("the spiking neuron", return_tensors="pt")
    want = model.generate(**one, max_new_tokens=12, do_sample=False)[0, one["input_ids"].shape[1]:]
    assert got == want.tolist()
    # text pieces concatenate to the decoded ids
    gen2 = StreamingGenerator(model, tokenizer, temperature=0, stop_at_eos=False)
    gen2.feed("the spiking neuron")
    assert "".join(gen2.generate_text(12)) == tokenizer.decode(got, skip_special_tokens=True)


def test_feed_continues_state_like_one_prompt(tokenizer):
    """Two turns fed one after the other = the concatenated text fed at once: nothing is re-read."""
    model = make_model(tokenizer)
    a = StreamingGenerator(model, tokenizer, temperature=0)
    ids = tokenizer("the spiking neuron fires. a language model", add_special_tokens=False)["input_ids"]
    a.feed_ids(ids[:5])
    a.feed_ids(ids[5:])
    b = StreamingGenerator(model, tokenizer, temperature=0, chunk_size=1)
    b.feed_ids(ids)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    assert a.tokens_seen == b.tokens_seen == len(ids)


def test_seeded_sampling_is_reproducible(tokenizer):
    model = make_model(tokenizer)
    runs = []
    for _ in range(2):
        gen = StreamingGenerator(model, tokenizer, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2,
                                 seed=123, stop_at_eos=False)
        gen.feed("a language model")
        runs.append(list(gen.generate(15)))
    assert runs[0] == runs[1]


def test_memory_flat_over_long_stream(tokenizer):
    """Far past the attention window and any training length: the state and the RSS stay flat."""
    model = make_model(tokenizer, hidden_size=16, num_hidden_layers=2, block_types=["ssm", "attention"],
                       num_attention_heads=2)
    gen = StreamingGenerator(model, tokenizer, temperature=1.0, seed=0, stop_at_eos=False, penalty_window=16,
                             repetition_penalty=1.1)
    gen.feed("the spiking neuron")

    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    it = gen.generate(None)  # unbounded
    for _ in range(100):
        next(it)
    size, rss = gen.state_nbytes(), rss_kib()
    for _ in range(500):
        next(it)
    assert gen.tokens_seen > 600
    assert gen.state_nbytes() == size
    assert len(gen.recent) == 16
    assert torch.isfinite(gen.logits).all()
    assert rss_kib() - rss < 16 * 1024  # KiB: a leak of even 20 KiB per token would show


def test_sampling_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0, 0.5])
    x = process_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(x).tolist() == [False, True, True, False, False]
    p = torch.softmax(logits, -1)  # 0.09, 0.66, 0.24, ...: top_p 0.7 keeps the two most likely
    x = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.isfinite(x).tolist() == [False, True, True, False, False] and p[1] < 0.7
    x = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert torch.isfinite(x).sum() == 1
    x = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0), torch.tensor([1, 3, 1]))
    assert x.tolist() == [1.0, 1.5, 2.0, -2.0, 0.5]
    assert sample_token(logits, SamplingParams(temperature=0)) == 1
    assert sample_token(logits, SamplingParams(temperature=0, repetition_penalty=2.0), torch.tensor([1])) == 2
    x = process_logits(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(x, logits * 2)


@pytest.mark.parametrize("kwargs,match", [(dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"),
                                          (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                          (dict(repetition_penalty=0), "repetition_penalty"),
                                          (dict(temperature=float("nan")), "temperature")])
def test_invalid_sampling_params(tokenizer, kwargs, match):
    model = make_model(tokenizer)
    with pytest.raises(ValueError, match=match):
        StreamingGenerator(model, tokenizer, **kwargs)
    gen = StreamingGenerator(model, tokenizer)
    gen.feed("a")
    with pytest.raises(ValueError, match=match):
        gen.generate(3, **kwargs)  # raised at the call


def test_generate_before_feed_is_an_error(tokenizer):
    gen = StreamingGenerator(make_model(tokenizer), tokenizer)
    with pytest.raises(ValueError, match="feed"):
        gen.generate(3)
    assert list(gen.generate(0)) == []


# -- spiking analysis ------------------------------------------------------------------------------
def test_energy_counts_by_hand():
    lin = nn.Linear(3, 5, bias=False)
    with EnergyCounter(nn.Sequential(lin)) as c:
        lin(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 4.0]]))  # 7 spikes -> 7 x 5 accumulates
    r = c.report(tokens=2)
    assert r["networks"]["spiking"]["ac_per_token"] == 7 * 5 / 2 and r["networks"]["spiking"]["mac_per_token"] == 0
    assert r["networks"]["dense"]["mac_per_token"] == 3 * 5
    assert r["spike_fed_linears"] == ["0"]
    with EnergyCounter(nn.Sequential(lin), mac_pj=1.0, ac_pj=0.5) as c:
        lin(torch.tensor([[0.5, 0.0, 2.0]]))  # not spikes: dense MACs in both networks
    r = c.report(tokens=1)
    assert r["networks"]["spiking"]["mac_per_token"] == 15 and r["networks"]["spiking"]["energy_pj_per_token"] == 15
    assert r["dense_fed_linears"] == ["0"]


def test_spiking_analysis_of_model(tokenizer):
    model = make_model(tokenizer)
    ids = torch.randint(0, len(tokenizer), (1, 48))
    r = spiking_analysis(model, ids)
    e = r["energy"]
    assert not e["dense_fed_linears"]  # every Linear of a SpikeLM reads spikes
    assert len(e["spike_fed_linears"]) == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert e["networks"]["dense"]["energy_pj_per_token"] > e["networks"]["spiking"]["energy_pj_per_token"] > 0
    # the non-linear parts are the same in both networks
    for cat in ("norm", "neuron", "attention", "rotary", "residual"):
        assert e["networks"]["dense"]["by_category"][cat] == e["networks"]["spiking"]["by_category"][cat]
    # ACs of the spike-fed Linears == their input spikes x fan-out, as FiringRateMonitor counts them
    f = r["firing"]
    assert 0 < f["mean_rate"] < 1 and f["spikes_per_token"] > 0
    assert {"ssm.core", "ssm.gate", "attention.q_spikes", "final_spikes"} <= set(f["groups"])
    lm_head_spikes = f["layers"]["model.final_spikes"]["spikes"]
    assert lm_head_spikes * len(tokenizer) <= e["networks"]["spiking"]["by_category"]["linear"]["ac_per_token"] * 48


def test_unfolded_spikes_give_the_same_logits(tokenizer):
    model = make_model(tokenizer)
    ids = torch.randint(0, len(tokenizer), (1, 40))
    r = unfolding_check(model, ids)
    assert r["unfolded_calls"] > 0 and r["dense_calls"] == 0 and r["substeps"] == 4 <= r["max_substeps"]
    assert r["max_abs_logit_diff"] < 1e-5 and r["argmax_agreement"] == 1.0
    r64 = unfolding_check(model.double(), ids)
    assert r64["max_abs_logit_diff"] < 1e-12


# -- command-line tools ----------------------------------------------------------------------------
def _run(script, *args, stdin=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, input=stdin, timeout=120)


def test_generate_cli_smoke(model_dir):
    r = _run("generate.py", "--model", model_dir, "--prompt", "the spiking", "--max_new_tokens", 40,
             "--temperature", 0.7, "--top_k", 50, "--top_p", 0.9, "--repetition_penalty", 1.1, "--seed", 0,
             "--device", "cpu", "--dtype", "float32", "--ignore_eos")
    assert r.returncode == 0, r.stderr
    assert "40 tokens in" in r.stderr and "tokens/s" in r.stderr and "peak RSS" in r.stderr
    assert r.stdout.strip() and "Traceback" not in r.stderr


def test_generate_sparse_flag(model_dir, capsys):
    """--sparse on runs every spike-fed linear through the event-driven op; off never does."""
    import generate
    from spikelm.ops import record_backends

    calls = {}
    for mode in ("on", "off"):
        with record_backends() as ran:
            assert generate.main(["--model", str(model_dir), "--prompt", "the spiking", "--max_new_tokens", "8",
                                  "--temperature", "0", "--ignore_eos", "--sparse", mode]) == 0
        calls[mode] = sum(op == "spike_linear" for op, _ in ran)
        out = capsys.readouterr()
        assert out.out.strip() and f"sparse {mode}" in out.err
    assert calls["on"] >= 8 * 17 and calls["off"] == 0  # 8 steps x (4 blocks x >= 4 linears + the LM head)


def test_int8_flags(model_dir, text_file, capsys):
    """--int8: generate.py decodes through the int8 product; evaluate.py ppl scores with it, near the float
    perplexity; with --sparse off it is a clear error in both."""
    import evaluate
    import generate
    from spikelm.ops import record_backends

    with record_backends() as ran:
        assert generate.main(["--model", str(model_dir), "--prompt", "the spiking", "--max_new_tokens", "4",
                              "--temperature", "0", "--ignore_eos", "--sparse", "on", "--int8"]) == 0
    err = capsys.readouterr().err
    assert "sparse on int8" in err and "_int8 " in err and "no call took" not in err  # the calls it made, by backend
    backends = {b for op, b in ran if op == "spike_linear"}
    assert backends and backends <= {"c_int8", "torch_int8"}
    assert generate.main(["--model", str(model_dir), "--prompt", "x", "--sparse", "off", "--int8"]) == 2
    assert "--int8" in capsys.readouterr().err

    ppl = {}
    for flags in ([], ["--sparse", "on", "--int8"]):
        assert evaluate.main(["ppl", "--model", str(model_dir), "--text_file", str(text_file), "--context", "32",
                              *flags]) == 0
        res = json.loads(capsys.readouterr().out)
        ppl[bool(flags)] = res["perplexity"]
        assert res["int8"] == bool(flags)
        assert any(b.endswith("_int8") for b in res["spike_linear_calls"]) == bool(flags)
    assert ppl[True] != ppl[False] and abs(ppl[True] / ppl[False] - 1) < 0.05  # quantised: close, not equal
    for bad in (["--sparse", "off"], []):  # off: no sparse product; auto in parallel: a float score
        assert evaluate.main(["ppl", "--model", str(model_dir), "--text_file", str(text_file), *bad, "--int8"]) == 2
        assert "--int8" in capsys.readouterr().err


def test_generate_interactive_keeps_state(model_dir, monkeypatch, capsys):
    import generate

    monkeypatch.setattr(sys, "stdin", io.StringIO("the spiking\n\na language model\n"))
    assert generate.main(["--model", str(model_dir), "--interactive", "--max_new_tokens", "5", "--temperature",
                          "0", "--ignore_eos"]) == 0
    err = capsys.readouterr().err
    assert "10 tokens in" in err  # two turns of 5 on one state
    assert err.count("> ") >= 2


def test_evaluate_cli_smoke(model_dir, text_file, tmp_path):
    out_json, out_png = tmp_path / "pos.json", tmp_path / "pos.png"
    r = _run("evaluate.py", "position", "--model", model_dir, "--text_file", text_file, "--multiple", 4,
             "--windows", 1, "--stream_chunk", 2, "--out_json", out_json, "--out_png", out_png)
    assert r.returncode == 0, r.stderr
    res = json.loads(out_json.read_text())
    assert res["train_len"] == 16 and res["window_tokens"] == 65  # train_len read from run_config.json
    assert res["agreement"]["ppl_rel_diff"] < 1e-6
    assert res["meta"]["command"].startswith("python evaluate.py position")
    assert out_png.stat().st_size > 1000 and json.loads(r.stdout) == res


def tokenizer_of(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_evaluate_ppl_and_spikes_in_process(model_dir, text_file, tmp_path, capsys):
    import evaluate

    assert evaluate.main(["ppl", "--model", str(model_dir), "--text_file", str(text_file), "--context", "32"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["context"] == 32 and res["perplexity"] > 1
    assert 1 < res["unigram_ppl_of_text"] < len(tokenizer_of(model_dir))
    n_tokens = len(tokenizer_of(model_dir)(text_file.read_text(encoding="utf-8"))["input_ids"])
    assert n_tokens > 2 * 32 and n_tokens % 31 != 1  # several windows and a partial tail
    assert res["scored_tokens"] == n_tokens - 1  # every token after the first, the tail included, once
    png = tmp_path / "spikes.png"
    assert evaluate.main(["spikes", "--model", str(model_dir), "--text_file", str(text_file), "--tokens", "64",
                          "--out_png", str(png)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["unfolding_check"]["argmax_agreement"] == 1.0 and res["tokens"] == 64
    assert res["energy"]["mac_pj"] == 4.6 and res["energy"]["ac_pj"] == 0.9 and png.stat().st_size > 1000
    sparse = res["sparse_inference"]  # density and bytes of weights read per token of every spike-fed linear
    assert "lm_head" in sparse["layers"] and 0 < sparse["mean_density"] < 1
    assert 0 < sparse["total"]["sparse_bytes_per_token"] < sparse["total"]["dense_bytes_per_token"]


def test_cli_not_a_model_folder(tmp_path):
    r = _run("generate.py", "--model", tmp_path, "--prompt", "hello")
    assert r.returncode == 2
    assert "not a model folder" in r.stderr and str(tmp_path) in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--top_p", "1.5"], "--top_p must lie in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--top_k", "-3"], "--top_k must be"),
    (["--repetition_penalty", "0"], "--repetition_penalty must be"),
    (["--max_new_tokens", "-1"], "--max_new_tokens must be"),
])
def test_generate_invalid_sampling_parameter(model_dir, capsys, args, message):
    import generate

    assert generate.main(["--model", str(model_dir), "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def short_text(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("the spiking neuron")
    return f


def test_bad_files(model_dir, tmp_path, capsys):
    import evaluate
    import generate

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert generate.main(["--model", str(model_dir), "--prompt_file", str(empty)]) == 2
    assert "--prompt_file" in capsys.readouterr().err
    assert generate.main(["--model", str(model_dir), "--prompt_file", str(tmp_path / "nope.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert generate.main(["--model", str(model_dir), "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert evaluate.main(["ppl", "--model", str(model_dir), "--text_file", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    other = tmp_path / "other_model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert evaluate.main(["ppl", "--model", str(other), "--text_file", str(model_dir / "run_config.json")]) == 2
    assert "not a SpikeLM model" in capsys.readouterr().err
    assert evaluate.main(["ppl", "--model", str(tmp_path / "missing"), "--text_file", str(short_text(tmp_path))]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert evaluate.main(["position", "--model", str(model_dir), "--text_file", str(short_text(tmp_path))]) == 2
    assert "fewer than one window" in capsys.readouterr().err


def test_check_sparse_flags_names_the_conflict():
    from spikelm.eval.loading import UserError, check_sparse_flags

    check_sparse_flags("auto", True, torch.device("cpu"))
    check_sparse_flags("off", False, torch.device("cuda"))  # no int8: nothing to check
    with pytest.raises(UserError, match="--sparse auto or on"):
        check_sparse_flags("off", True, torch.device("cpu"))
    with pytest.raises(UserError, match="CPU only"):
        check_sparse_flags("on", True, torch.device("cuda"))  # (only the device's type is read: no GPU needed)
