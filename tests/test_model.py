"""SpikeLMForCausalLM: HF round trips, generation equivalence, packing, leakage, every block and neuron type."""
import threading

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, TextIteratorStreamer, TextStreamer, pipeline

from spikelm import SpikeLMCache, SpikeLMConfig, SpikeLMForCausalLM, SpikeLMModel
from spikelm.data import train_bpe_tokenizer
from spikelm.models import CACHE_NAME
from spikelm.neurons import DSN, DSNState
from spikelm.ops import record_backends
from spikelm.ops.spike_linear import kernel_calls, op_kernel

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, attention_window=6,
            ssm_expand=2, mlp_ratio=2)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return SpikeLMForCausalLM(SpikeLMConfig(**{**TINY, **overrides})).eval()


def test_default_config_is_hybrid_and_auto_registered():
    cfg = SpikeLMConfig()
    assert cfg.model_type == "spikelm" and "attention" in cfg.block_types and cfg.block_types.count("ssm") > 4
    assert isinstance(AutoConfig.for_model("spikelm"), SpikeLMConfig)
    model = AutoModelForCausalLM.from_config(SpikeLMConfig(**TINY))
    assert isinstance(model, SpikeLMForCausalLM)
    assert isinstance(AutoModel.from_config(SpikeLMConfig(**TINY)), SpikeLMModel)


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 17))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SpikeLMForCausalLM)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # tied head stays tied
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_loading_never_reinitialises_weights(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.123)  # no initialiser produces these values
    model.save_pretrained(tmp_path)
    loaded = SpikeLMForCausalLM.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_loss_shifts_labels_inside():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, labels=ids)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    labels = ids.clone()
    labels[:, :5] = -100
    want = torch.nn.functional.cross_entropy(out.logits[:, 4:-1].reshape(-1, 97), ids[:, 5:].reshape(-1))
    torch.testing.assert_close(model(ids, labels=labels).loss, want)
    # right padding: no target at or after a padded position, and the row's last token predicts nothing
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    out = model(ids, attention_mask=mask, labels=ids)
    kept = [out.logits[0, :-1], out.logits[1, :8]]
    want = torch.nn.functional.cross_entropy(torch.cat(kept), torch.cat([ids[0, 1:], ids[1, 1:9]]))
    torch.testing.assert_close(out.loss, want)


def test_logits_to_keep():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:])


@pytest.mark.parametrize("block_types", [["ssm", "attention", "ssm", "attention"], ["attention"] * 4, ["ssm"] * 4])
def test_generation_equivalence_left_padded(block_types):
    """Left-padded batch: parallel prefill of part of each row, then token-by-token decoding, equals one
    full parallel forward of each unpadded row (fp32, CPU)."""
    model = tiny_model(block_types=block_types)
    lengths = [13, 9, 4]
    T = max(lengths)
    rows = [torch.randint(1, 97, (n,)) for n in lengths]
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    prefill = T - 5  # the shortest row is still all padding plus one token here
    with torch.no_grad():
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        cache = out[CACHE_NAME]
        logits = [out.logits]
        for t in range(prefill, T):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True, **{CACHE_NAME: cache})
            cache = out[CACHE_NAME]
            logits.append(out.logits)
        logits = torch.cat(logits, dim=1)
        for b, r in enumerate(rows):
            ref = model(r[None]).logits[0]
            got = logits[b, T - len(r):]
            assert (got - ref).abs().max().item() <= 1e-4


def test_generate_greedy_matches_manual_loop_and_padding():
    model = tiny_model()
    a, b = torch.randint(1, 97, (1, 10)), torch.randint(1, 97, (1, 6))
    with torch.no_grad():
        def manual(ids, n=8):
            for _ in range(n):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            return ids

        ids = torch.zeros(2, 10, dtype=torch.long)
        ids[0], ids[1, 4:] = a[0], b[0]
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :4] = 0
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], manual(a)[0])
    assert torch.equal(out[1, 4:], manual(b)[0])


def test_generate_sampling_beam_and_repetition_penalty():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 7))
    torch.manual_seed(1)
    s1 = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=10, top_p=0.9,
                        repetition_penalty=1.3, pad_token_id=0)
    torch.manual_seed(1)
    s2 = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=10, top_p=0.9,
                        repetition_penalty=1.3, pad_token_id=0)
    assert s1.shape == (2, 13) and torch.equal(s1, s2)
    beams = model.generate(ids, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False,
                           pad_token_id=0)
    assert beams.shape == (4, 12)
    assert torch.equal(beams[0, :7], ids[0]) and torch.equal(beams[2, :7], ids[1])


def test_reorder_cache_matches_recomputation():
    """After reorder_cache, every state (blocks and the spike layer before the head) follows its row."""
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        cache = model(ids[:, :8], use_cache=True)[CACHE_NAME]
        cache.reorder_cache(torch.tensor([1, 0]))
        nxt = ids[[1, 0], 8:9]
        got = model(nxt, use_cache=True, **{CACHE_NAME: cache}).logits[:, -1]
        want = model(ids[[1, 0]]).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_beam_search_scores_match_recomputation():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 6))
    out = model.generate(ids, max_new_tokens=6, num_beams=4, num_return_sequences=4, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0, length_penalty=0.0)
    with torch.no_grad():
        for seq, score in zip(out.sequences, out.sequences_scores):
            logp = torch.log_softmax(model(seq[None]).logits[0, 5:-1], dim=-1)
            torch.testing.assert_close(logp.gather(1, seq[6:, None]).sum(), score, atol=1e-3, rtol=0)


def test_generate_from_inputs_embeds():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 6))
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False, pad_token_id=0)
        from_ids = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(from_embeds[0, -5:], from_ids[0, 6:])


def test_cache_is_constant_size():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 4))
    sizes = {}
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out[CACHE_NAME]
        for step in range(1, 60):
            out = model(ids[:, -1:], use_cache=True, **{CACHE_NAME: cache})
            cache = out[CACHE_NAME]
            sizes[step] = cache.nbytes()
    assert isinstance(cache, SpikeLMCache)
    assert sizes[10] == sizes[59]
    membranes = [s for s in _tensors(cache) if s.dtype == torch.float32]
    assert membranes  # float32 states


def _tensors(cache):
    from spikelm.models.cache import _tensors as t

    return [x for layer in cache.layers for x in t(layer.state)]


def test_states_float32_with_bf16_weights():
    model = tiny_model().to(torch.bfloat16)
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        cache = model(ids, use_cache=True)[CACHE_NAME]
    membrane = cache.layers[0].state["core"].membrane
    assert membrane.dtype == torch.float32


def _packed_inputs():
    docs = [torch.randint(1, 97, (n,)) for n in (7, 3, 11)]
    return docs, torch.cat(docs)[None]


@pytest.mark.parametrize("block_types", [["ssm", "attention", "ssm", "attention"]])
@pytest.mark.parametrize("neuron_type", ["dsn", "lif", "sliding_psn"])
def test_packed_equals_separate(block_types, neuron_type):
    model = tiny_model(block_types=block_types, neuron_type=neuron_type)
    docs, packed = _packed_inputs()
    cu = torch.tensor([0, 7, 10, 21])
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        by_cu = model(packed, cu_seqlens=cu).logits[0]
        by_pos = model(packed, position_ids=positions).logits[0]
        for d, (s, e) in zip(docs, [(0, 7), (7, 10), (10, 21)]):
            alone = model(d[None]).logits[0]
            torch.testing.assert_close(by_cu[s:e], alone, atol=1e-4, rtol=0)
            torch.testing.assert_close(by_pos[s:e], alone, atol=1e-4, rtol=0)


def test_packed_rows_in_a_batch():
    """position_ids restarting at 0 inside several rows: every row start and every reset is a boundary."""
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 10))
    pos = torch.tensor([list(range(4)) + list(range(6)), list(range(10))])
    with torch.no_grad():
        got = model(ids, position_ids=pos).logits
        torch.testing.assert_close(got[0, :4], model(ids[:1, :4]).logits[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[0, 4:], model(ids[:1, 4:]).logits[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[1], model(ids[1:]).logits[0], atol=1e-4, rtol=0)


def test_no_leakage_across_documents():
    model = tiny_model(attention_window=64)
    docs, packed = _packed_inputs()
    cu = torch.tensor([0, 7, 10, 21])
    changed = packed.clone()
    changed[0, 7:10] = torch.randint(1, 97, (3,))  # document 1 changes
    with torch.no_grad():
        a = model(packed, cu_seqlens=cu).logits
        b = model(changed, cu_seqlens=cu).logits
    assert torch.equal(a[0, 10:], b[0, 10:])  # document 2 is untouched
    assert torch.equal(a[0, :7], b[0, :7])
    assert not torch.equal(a[0, 7:10], b[0, 7:10])


def test_gradient_checkpointing_same_gradients():
    model = tiny_model().train()
    ids = torch.randint(0, 97, (2, 16))
    model(ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model(ids, labels=ids).loss.backward()
    assert model.model.gradient_checkpointing
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5)


def test_longer_than_window_and_training_length():
    model = tiny_model(attention_window=4)
    ids = torch.randint(1, 97, (1, 300))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :100], use_cache=True)
        cache, logits = out[CACHE_NAME], [out.logits]
        for chunk in (ids[:, 100:250], ids[:, 250:]):  # parallel chunks carrying the state
            out = model(chunk, use_cache=True, **{CACHE_NAME: cache})
            cache = out[CACHE_NAME]
            logits.append(out.logits)
    assert torch.isfinite(full).all()
    assert (torch.cat(logits, 1) - full).abs().max() <= 1e-4


@pytest.mark.parametrize("neuron_type", ["dsn", "lif", "psn", "sliding_psn"])
@pytest.mark.parametrize("block_types", [["ssm", "ssm"], ["attention", "attention"]])
def test_every_block_and_neuron_type(neuron_type, block_types):
    model = tiny_model(neuron_type=neuron_type, block_types=block_types, num_hidden_layers=2, psn_T=32).train()
    ids = torch.randint(1, 97, (2, 12))  # no pad id (0) inside, or generate would infer padding
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    gen = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 9)
    with torch.no_grad():
        cur = ids[:, :5]
        for _ in range(4):
            cur = torch.cat([cur, model(cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, cur)


def test_binary_spike_mode_model():
    model = tiny_model(spike_mode="binary", surrogate="atan")
    ids = torch.randint(0, 97, (1, 8))
    assert torch.isfinite(model(ids, labels=ids).loss)


@pytest.fixture(scope="module")
def tokenizer():
    text = ["the spiking neuron fires when its membrane crosses the threshold. " * 3,
            "a language model predicts the next token from the ones before it. " * 3] * 20
    return train_bpe_tokenizer(text, vocab_size=300)


def test_local_tokenizer_pipeline_and_streamers(tokenizer, capsys):
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    gen = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    out = gen("the spiking neuron", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("the spiking neuron")

    ids = tokenizer(["the spiking neuron", "a model"], return_tensors="pt", padding=True)
    assert ids["attention_mask"][1, 0] == 0  # left padding
    model.generate(**ids, max_new_tokens=4, do_sample=False, streamer=None)

    one = tokenizer("the spiking neuron", return_tensors="pt")
    model.generate(**one, max_new_tokens=4, do_sample=False, streamer=TextStreamer(tokenizer))
    assert "the spiking neuron" in capsys.readouterr().out

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**one, max_new_tokens=6, do_sample=False,
                                                                 streamer=streamer))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    expected = model.generate(**one, max_new_tokens=6, do_sample=False)
    assert streamed == tokenizer.decode(expected[0, one["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(vocab_size=0), "vocab_size"), (dict(hidden_size=-1), "hidden_size"),
        (dict(block_types=["ssm", "mamba", "ssm", "ssm"]), r"block_types\[1\]"),
        (dict(block_types=["ssm"]), "one type per layer"), (dict(neuron_type="izhikevich"), "neuron_type"),
        (dict(tau=0.0), "tau"), (dict(max_spike=0), "max_spike"), (dict(spike_mode="ternary"), "spike_mode"),
        (dict(surrogate="relu"), "surrogate"), (dict(num_attention_heads=5), "divisible"),
        (dict(attention_window=0), "attention_window"), (dict(rope_theta=-1.0), "rope_theta"),
        (dict(kernel_size=0), "kernel_size"), (dict(lif_reset="none"), "lif_reset"),
        (dict(decay_init_range=[0.5, 0.1]), "decay_init_range"), (dict(decay_init_range=[0.0, 0.5]), "decay_init_range"),
        (dict(decay_init_range=[0.1, 1.0]), "decay_init_range"), (dict(decay_init_range=0.5), "decay_init_range"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpikeLMConfig(**{**TINY, **kwargs})


def test_decay_init_range_sets_every_dsn_and_round_trips(tmp_path):
    model = tiny_model(decay_init_range=[0.2, 0.7])
    for m in model.modules():
        if isinstance(m, DSN):
            alpha = torch.sigmoid(m.conv_bias.detach().double()) ** (1 / m.tau)
            assert alpha.min().item() == pytest.approx(0.2, abs=1e-6) and alpha.max().item() == pytest.approx(0.7, abs=1e-6)
    model.save_pretrained(tmp_path)
    assert SpikeLMConfig.from_pretrained(tmp_path).decay_init_range == [0.2, 0.7]


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="token id 97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="padding between tokens"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0, 1]]))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 3, dtype=torch.long))


def test_compile_decoding_matches_eager_and_leaves_prefill_eager():
    model = tiny_model(block_types=["ssm", "attention", "ssm", "ssm"], attention_window=6)
    ids = torch.randint(0, 97, (2, 5))
    want = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    calls = []
    # aot_eager: the same dynamo capture as Inductor without its C++ build, so the test stays fast
    model.compile_decoding(backend=lambda gm, example: (calls.append(1), gm)[1])
    got = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert calls, "the decoding steps never went through torch.compile"
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-5, rtol=0)
    compiles = len(calls)
    with record_backends():  # the graphs do not depend on whether backends are being recorded
        again = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert len(calls) == compiles and torch.equal(again, want.sequences)
    model.train()
    loss = model(ids, labels=ids).loss  # training and prefill stay eager (T > 1)
    loss.backward()


def test_decoding_states_keep_one_layout_so_a_compiled_step_specialises_on_it():
    """Every DSN conv history, after the prompt and after each step, is a fresh contiguous [B, k-1, C] buffer.
    (As views of differently shaped buffers their strides differed between prefill and steps, and the
    compiled step took each one as a dynamic int: a third of a small model's step went into those.)"""
    model = tiny_model(block_types=["ssm", "attention", "ssm", "ssm"], attention_window=6)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for step in range(3):
            cache = out[CACHE_NAME]
            convs = [t for layer in cache.layers for t in _conv_histories(layer.state)] + \
                _conv_histories(cache.final)
            assert len(convs) >= 4 * 4
            for conv in convs:
                want = torch.empty(conv.shape).stride()
                assert conv.stride() == want, (step, conv.shape, conv.stride())
            out = model(out.logits[:, -1:].argmax(-1), use_cache=True, **{CACHE_NAME: cache})


def _conv_histories(state) -> list:
    if isinstance(state, DSNState):
        return [state.conv]
    if isinstance(state, dict):
        return [c for v in state.values() for c in _conv_histories(v)]
    return []


def test_compile_decoding_uses_inductors_cpp_wrapper_on_cpu_unless_told_otherwise(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: (seen.append(kwargs), fn)[1])
    model = tiny_model()
    model.compile_decoding()
    model.compile_decoding(mode="max-autotune-no-cudagraphs")
    model.compile_decoding(backend="aot_eager")
    model.compile_decoding(options={"cpp_wrapper": False}, dynamic=True)
    model.to("meta").compile_decoding()  # not a CPU model: torch.compile's own defaults
    assert seen == [{"options": {"cpp_wrapper": True}}, {"mode": "max-autotune-no-cudagraphs"},
                    {"backend": "aot_eager"}, {"options": {"cpp_wrapper": False}, "dynamic": True}, {}]


@pytest.mark.slow
def test_compile_decoding_default_inductor_build_matches_eager_with_sparse_linears():
    """The default path end to end: Inductor with its C++ wrapper, the sparse op inside the graph."""
    model = tiny_model(block_types=["ssm", "attention", "ssm", "ssm"], attention_window=6)
    model.set_sparse_inference("on")
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = model.generate(ids, **kwargs)
    model.compile_decoding()
    before = kernel_calls()
    got = model.generate(ids, **kwargs)
    ran = {k: n - before[k] for k, n in kernel_calls().items()}
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=0)
    # the graph calls the op's CPU kernel at run time: the sparse walk ran, never the dense fallback
    walk = "c" if op_kernel() == "c" else "torch"
    assert ran[walk] >= 9 * 17 and ran["dense"] == 0  # 9 compiled steps x (4 blocks x >= 4 linears + the head)


def test_firing_loss_adds_the_mean_spike_count_in_training_only():
    """firing_loss_coef c: training loss = cross-entropy + c x mean spikes per neuron-step (what
    FiringRateMonitor counts), with gradients through the spikes' surrogate, also under both kinds
    of activation checkpointing; evaluation reports the plain cross-entropy."""
    from spikelm.eval import FiringRateMonitor

    ids = torch.randint(0, 97, (2, 16))
    plain = tiny_model().train()
    model = tiny_model(firing_loss_coef=0.5).train()
    with FiringRateMonitor(model) as monitor:
        out = model(ids, labels=ids)
    totals = monitor.totals.values()
    mean_spikes = sum(t["spikes"] for t in totals) / sum(t["elements"] for t in totals)
    assert out.firing_loss is not None and abs(out.firing_loss.item() - mean_spikes) < 1e-6
    ce = plain(ids, labels=ids).loss
    torch.testing.assert_close(out.loss, ce + 0.5 * out.firing_loss)
    grads = torch.autograd.grad(out.firing_loss, list(model.parameters()), allow_unused=True, retain_graph=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    out.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for reentrant in (False, True):
        model.zero_grad()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers > 5.17
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        again = model(ids, labels=ids)
        torch.testing.assert_close(again.firing_loss, out.firing_loss)
        again.loss.backward()
        for n, p in model.named_parameters():
            if n in want:
                torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5)
    model.eval()
    evaluated = model(ids, labels=ids)
    assert evaluated.firing_loss is None
    torch.testing.assert_close(evaluated.loss, plain.eval()(ids, labels=ids).loss)
    assert plain.train()(ids, labels=ids).firing_loss is None  # coefficient 0: nothing recorded
    model.train()  # left padding does not dilute the loss: only real positions count
    padded = torch.cat([torch.zeros(2, 16, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask, labels=padded).firing_loss, out.firing_loss)
    with pytest.raises(ValueError, match="firing_loss_coef"):
        SpikeLMConfig(**TINY, firing_loss_coef=-1.0)


def test_firing_loss_target_spares_layers_below_it():
    """firing_loss_target r: each neuron layer pays only for what it fires above r spikes per neuron-step,
    also under activation checkpointing."""
    from spikelm.eval import FiringRateMonitor

    ids = torch.randint(0, 97, (2, 16))
    model = tiny_model(firing_loss_coef=1.0, firing_loss_target=0.5).train()
    with FiringRateMonitor(model) as monitor:
        out = model(ids, labels=ids)
    layers = list(monitor.totals.values())
    assert any(t["spikes"] < 0.5 * t["elements"] for t in layers) and any(t["spikes"] > 0.5 * t["elements"] for t in layers)
    want = sum(max(0.0, t["spikes"] - 0.5 * t["elements"]) for t in layers) / sum(t["elements"] for t in layers)
    assert abs(out.firing_loss.item() - want) < 1e-6
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    torch.testing.assert_close(model(ids, labels=ids).firing_loss, out.firing_loss)
    with pytest.raises(ValueError, match="firing_loss_target"):
        SpikeLMConfig(**TINY, firing_loss_target=float("nan"))
