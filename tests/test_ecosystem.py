"""SpikeLM as a Hugging Face citizen: padding on either side, the standard forward kwargs, a real transformers Cache."""
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import Cache

from spikelm import SpikeLMCache, SpikeLMConfig, SpikeLMForCausalLM
from spikelm.models import CACHE_NAME

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, attention_window=6,
            ssm_expand=2, mlp_ratio=2)
HYBRID = ["ssm", "attention", "ssm", "attention"]


def tiny_model(**overrides):
    torch.manual_seed(0)
    return SpikeLMForCausalLM(SpikeLMConfig(**{**TINY, **overrides})).eval()


def padded(rows, T, side):
    """ids and mask [len(rows), T]; side "right", "left", or "both" (one pad before, the rest after)."""
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        start = {"right": 0, "left": T - len(r), "both": min(1, T - len(r))}[side]
        ids[b, start:start + len(r)] = r
        mask[b, start:start + len(r)] = 1
    return ids, mask


def rows_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("side", ["right", "left", "both"])
@pytest.mark.parametrize("block_types", [["ssm"] * 4, HYBRID])
@pytest.mark.parametrize("use_cache", [False, True])
def test_padding_either_side_gives_the_unpadded_outputs(side, block_types, use_cache):
    model = tiny_model(block_types=block_types)
    rows = rows_of([11, 7, 3])
    ids, mask = padded(rows, 12, side)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=use_cache)
        for b, r in enumerate(rows):
            ref = model(r[None], use_cache=False).logits[0]
            got = out.logits[b][mask[b].bool()]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "both"])
@pytest.mark.parametrize("block_types", [["ssm"] * 4, HYBRID])
def test_cache_after_padding_holds_each_rows_state_after_its_last_token(side, block_types):
    """Continuing a right-padded prefill token by token equals each row's own unpadded prefill + decoding."""
    model = tiny_model(block_types=block_types)
    rows = rows_of([9, 5, 2], seed=2)
    ids, mask = padded(rows, 10, side)
    nxt = torch.randint(1, 97, (3, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True)[CACHE_NAME]
        assert cache.positions.tolist() == [9, 5, 2]
        steps = []
        for t in range(nxt.shape[1]):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            out = model(nxt[:, t:t + 1], attention_mask=mask, use_cache=True, **{CACHE_NAME: cache})
            cache = out[CACHE_NAME]
            steps.append(out.logits[:, 0])
        got = torch.stack(steps, dim=1)
        for b, r in enumerate(rows):
            ref = model(torch.cat([r, nxt[b]])[None], use_cache=False).logits[0, len(r):]
            torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=0)


def test_padding_that_cannot_be_honoured_is_a_named_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="padding between tokens"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1]]))
    cache = model(torch.ones(1, 3, dtype=torch.long), use_cache=True)[CACHE_NAME]
    with pytest.raises(ValueError, match="continues a cache"):
        model(torch.ones(1, 2, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 1, 0]]), use_cache=True,
              **{CACHE_NAME: cache})


def test_standard_forward_kwargs():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 6))
    ref = model(ids).logits
    out = model(ids, output_attentions=False, return_dict=True, token_type_ids=torch.zeros_like(ids),
                cache_position=torch.arange(6))
    torch.testing.assert_close(out.logits, ref)
    with pytest.raises(ValueError, match="output_attentions=True"):
        model(ids, output_attentions=True)
    assert isinstance(model(ids, return_dict=False), tuple)
    model.config.return_dict = False
    assert isinstance(model(ids), tuple)
    model.config.return_dict = True
    model.config.output_hidden_states = True
    hs = model(ids).hidden_states
    assert hs is not None and len(hs) == TINY["num_hidden_layers"] + 1
    model.config.output_hidden_states = False
    assert model(ids).hidden_states is None


def test_attn_implementation_eager_and_sdpa_agree(tmp_path):
    tiny_model(block_types=HYBRID).save_pretrained(tmp_path)
    ids = torch.randint(1, 97, (2, 9))
    logits = {}
    for impl in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl).eval()
        assert model.config._attn_implementation == impl
        logits[impl] = model(ids).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=0)
    with pytest.raises((ValueError, ImportError)):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_cache_is_a_transformers_cache_that_generate_accepts():
    model = tiny_model(block_types=HYBRID)
    ids = torch.randint(1, 97, (2, 5))
    cache = SpikeLMCache(model.config)
    assert isinstance(cache, Cache) and len(cache) == TINY["num_hidden_layers"] and not cache.is_compileable
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                         **{CACHE_NAME: cache})
    assert out[CACHE_NAME] is cache and cache.get_seq_length() == 9 and cache.positions.tolist() == [9, 9]
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out.sequences, ref)
    # beam search reorders it (through Cache.reorder_cache), and a static cache request is ignored with a warning
    beams = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape == (2, 9)
    static = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(static, ref[:, :9])
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(1)


@pytest.mark.parametrize("block_types", [["ssm"] * 4, HYBRID])
def test_cache_rows_split_concatenate_and_round_trip(block_types):
    """Sessions of different lengths batched into one cache decode exactly as each alone; state_dict round trips."""
    model = tiny_model(block_types=block_types)
    rows = rows_of([10, 3, 6], seed=5)
    with torch.no_grad():
        caches = [model(r[None], use_cache=True)[CACHE_NAME] for r in rows]
        tensors, meta = caches[0].state_dict()
        restored = SpikeLMCache.from_state_dict(tensors, meta)
        assert restored.nbytes() == caches[0].nbytes()
        batch = SpikeLMCache.concatenate([restored, caches[1], caches[2]])
        assert batch.batch_size == 3 and batch.positions.tolist() == [10, 3, 6]
        tok = torch.randint(1, 97, (3, 1), generator=torch.Generator().manual_seed(6))
        out = model(tok, use_cache=True, **{CACHE_NAME: batch})
        for b, r in enumerate(rows):
            ref = model(torch.cat([r, tok[b]])[None], use_cache=False).logits[0, -1]
            torch.testing.assert_close(out.logits[b, -1], ref, atol=1e-5, rtol=0)
        parts = out[CACHE_NAME].split()
        assert [p.positions.tolist() for p in parts] == [[11], [4], [7]]
        for b, part in enumerate(parts):  # a row taken out keeps going alone
            nxt = model(tok[b:b + 1], use_cache=True, **{CACHE_NAME: part}).logits[0, -1]
            ref = model(torch.cat([rows[b], tok[b], tok[b]])[None], use_cache=False).logits[0, -1]
            torch.testing.assert_close(nxt, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="missing"):
        SpikeLMCache.from_state_dict({}, meta)
    with pytest.raises(ValueError, match="empty cache"):
        SpikeLMCache.concatenate([caches[0], SpikeLMCache(model.config)])
