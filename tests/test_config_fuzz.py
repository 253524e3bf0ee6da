"""Property-based tests (hypothesis, derandomized: the same examples every run) over SpikeLMConfig's
fields and train.py's flags: every invalid value or combination is a ValueError/TypeError (ConfigError
for flags) that names the field, never an error from inside torch; every valid config builds a model
whose forward runs; what the flags accept, AdamW, get_scheduler and set_seed accept too."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.training import ConfigError, adamw, parse_args
from spikelm.training.args import LR_SCHEDULERS, TrainArgs, all_keys


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- SpikeLMConfig ---------------------------------------------------------------------------------
# deterministic (derandomize: the same examples on every run), bounded in time
FUZZ = settings(derandomize=True, deadline=None, max_examples=150, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CONFIG_FIELDS = [p for p in inspect.signature(SpikeLMConfig.__init__).parameters
                 if p not in ("self", "kwargs")]
SMALL_BASE = dict(vocab_size=48, hidden_size=8, num_hidden_layers=2, block_types=["ssm", "attention"],
                  num_attention_heads=2, attention_window=4, ssm_expand=1, mlp_ratio=2, psn_T=16)
# any value a YAML file, a flag or a Python caller may pass
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 2), st.text(max_size=4),
    st.sampled_from(["dsn", "lif", "psn", "sliding_psn", "ssm", "attention", "binary", "atan", "soft", "4", "0.5"]),
    st.lists(st.one_of(st.sampled_from(["ssm", "attention"]), st.integers(0, 2), st.floats(0, 1)), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


def _forward_runs(cfg: SpikeLMConfig, T: int = 6) -> None:
    """Builds the model and runs a forward (and, when the model keeps state, a cached prompt + one step)."""
    torch.manual_seed(0)
    model = SpikeLMForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        out = model(ids, labels=ids)
        assert out.logits.shape == (2, T, cfg.vocab_size)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
        if model.model.supports_cache:
            prompt = model(ids[:, :-1], use_cache=True)
            step = model(ids[:, -1:], use_cache=True, **{"past_key_values": prompt.past_key_values}
                         if hasattr(prompt, "past_key_values") else {"cache": prompt.cache})
            torch.testing.assert_close(step.logits[:, -1], out.logits[:, -1], atol=1e-4, rtol=1e-4)


@st.composite
def valid_configs(draw):
    """Every field in a range a user may mean, at tiny sizes (the model is built and run)."""
    neuron = draw(st.sampled_from(["dsn", "lif", "psn", "sliding_psn"]))
    layers = draw(st.integers(1, 3))
    block_types = draw(st.lists(st.sampled_from(["ssm", "attention"]), min_size=layers, max_size=layers))
    heads = draw(st.sampled_from([1, 2, 4]))
    hidden = heads * 2 * draw(st.integers(1, 3))  # an even head dim
    short = draw(st.floats(0.01, 0.98))
    long_ = draw(st.floats(short, 0.999))
    kw = dict(vocab_size=draw(st.integers(8, 64)), hidden_size=hidden, num_hidden_layers=layers,
              block_types=block_types, neuron_type=neuron, tau=draw(st.floats(0.05, 4.0)),
              kernel_size=draw(st.integers(1, 5)), max_spike=draw(st.integers(1, 5)),
              spike_mode=draw(st.sampled_from(["integer", "binary"])), surrogate=draw(st.sampled_from(["rect", "atan"])),
              decay_init_range=[short, long_], psn_T=draw(st.integers(6, 24)), sliding_psn_k=draw(st.integers(1, 5)),
              lif_beta=draw(st.floats(0.0, 0.99)), lif_reset=draw(st.sampled_from(["hard", "soft"])),
              ssm_expand=draw(st.integers(1, 2)), num_attention_heads=heads,
              attention_window=draw(st.one_of(st.none(), st.integers(1, 8))),
              rope_theta=draw(st.floats(1.0, 1e6)), rms_norm_eps=draw(st.floats(1e-8, 1e-2)),
              tie_word_embeddings=draw(st.booleans()), initializer_range=draw(st.floats(1e-4, 0.5)),
              firing_loss_coef=draw(st.floats(0.0, 1.0)), firing_loss_target=draw(st.floats(0.0, 2.0)),
              surrogate_alpha=draw(st.floats(0.1, 8.0)), config_version=draw(st.sampled_from([None, 1, 2])),
              head_max_spike=draw(st.one_of(st.none(), st.integers(1, 16))),
              ssm_gate=draw(st.sampled_from([None, "binary", "integer", "none"])),
              neuron_input_scale=draw(st.one_of(st.none(), st.floats(0.25, 4.0))))
    if draw(st.booleans()):
        c_short = draw(st.floats(0.01, 0.98))
        kw["core_decay_init_range"] = [c_short, draw(st.floats(c_short, 0.999))]
    if draw(st.booleans()):
        kw["intermediate_size"] = draw(st.integers(1, 24))
    else:
        kw["mlp_ratio"] = draw(st.integers(1, 3))
    kw["pad_token_id"] = draw(st.one_of(st.none(), st.integers(0, kw["vocab_size"] - 1)))
    return kw


@settings(FUZZ, max_examples=100)
@given(valid_configs())
def test_every_valid_config_builds_a_model_whose_forward_runs(kw):
    cfg = SpikeLMConfig(**kw)
    again = SpikeLMConfig.from_dict(cfg.to_dict())  # what from_pretrained does with config.json
    assert again.block_types == cfg.block_types and again.intermediate_size == cfg.intermediate_size
    _forward_runs(cfg)


# per field: values that are wrong for it, each must be refused with the field named
NOT_AN_INT = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3), st.lists(st.integers(), max_size=2))
BAD_POSITIVE_INT = st.one_of(NOT_AN_INT, st.integers(max_value=0))
NOT_A_NUMBER = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.lists(st.floats(), max_size=2),
                         st.sampled_from([float("nan"), float("inf"), float("-inf")]))
BAD_POSITIVE_FLOAT = st.one_of(NOT_A_NUMBER, st.floats(max_value=0), st.integers(max_value=0))
BAD_CHOICE = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=6), st.lists(st.text(max_size=2), max_size=2))
INVALID = {
    **{f: BAD_POSITIVE_INT for f in ("vocab_size", "hidden_size", "num_hidden_layers", "kernel_size", "max_spike",
                                     "psn_T", "sliding_psn_k", "ssm_expand", "mlp_ratio", "num_attention_heads",
                                     "max_position_embeddings")},
    "intermediate_size": st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.integers(max_value=0)),
    **{f: BAD_POSITIVE_FLOAT for f in ("tau", "rms_norm_eps", "initializer_range", "surrogate_alpha")},
    # None is these fields' default (the config version's value)
    "head_max_spike": st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.integers(max_value=0)),
    "neuron_input_scale": st.one_of(st.booleans(), st.text(max_size=3), st.floats(max_value=0),
                                    st.sampled_from([float("nan"), float("inf")])),
    "ssm_gate": st.one_of(st.booleans(), st.integers(), st.text(max_size=6), st.lists(st.text(max_size=2), max_size=2)),
    "config_version": st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.integers().filter(
        lambda v: v not in (1, 2))),
    "tau": st.one_of(BAD_POSITIVE_FLOAT, st.floats(1e4, 1e300), st.floats(1e-300, 1e-18)),  # alpha**tau rounds to 0 or 1
    "rope_theta": st.one_of(BAD_POSITIVE_FLOAT, st.floats(1e-300, 0.999)),
    **{f: st.one_of(NOT_A_NUMBER, st.floats(max_value=-1e-9)) for f in ("firing_loss_coef", "firing_loss_target")},
    **{f: BAD_CHOICE for f in ("neuron_type", "spike_mode", "lif_reset")},
    "surrogate": st.one_of(st.booleans(), st.integers(), st.text(max_size=6), st.lists(st.text(max_size=2), max_size=2)),
    **{f: st.one_of(st.floats(), st.text(max_size=3), st.lists(st.floats(allow_nan=True), max_size=4).filter(
        lambda r: not (len(r) == 2 and 0 < r[0] <= r[1] < 1))) for f in ("decay_init_range", "core_decay_init_range")},
    "decay_init_range": st.one_of(st.none(), st.floats(), st.text(max_size=3), st.lists(
        st.floats(allow_nan=True), max_size=4).filter(lambda r: not (len(r) == 2 and 0 < r[0] <= r[1] < 1))),
    "lif_beta": st.one_of(NOT_A_NUMBER, st.floats(max_value=-1e-9), st.floats(min_value=1.0)),
    "block_types": st.one_of(st.booleans(), st.integers(), st.text(max_size=4),
                             st.lists(st.sampled_from(["ssm", "attention", "mamba", 1, None]), max_size=4).filter(
                                 lambda b: len(b) != 2 or not set(b) <= {"ssm", "attention"})),
    "attention_window": st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.integers(max_value=0)),
    **{f: st.one_of(st.none(), st.integers(), st.text(max_size=3), st.floats()) for f in ("tie_word_embeddings", "use_cache")},
    **{f: st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.integers(max_value=-1), st.integers(48, 10**6))
       for f in ("pad_token_id", "bos_token_id", "eos_token_id")},
}


def test_every_config_field_has_an_invalid_strategy():
    assert sorted(INVALID) == sorted(CONFIG_FIELDS)


@FUZZ
@given(st.data())
def test_invalid_config_fields_are_named(data):
    field = data.draw(st.sampled_from(sorted(INVALID)), label="field")
    value = data.draw(INVALID[field], label="value")
    kw = dict(SMALL_BASE, **{field: value})
    if field == "tie_word_embeddings" and value is None:  # None means the default (true), as in transformers
        return
    with pytest.raises((ValueError, TypeError), match=rf"SpikeLMConfig\.{field}\b|{field}="):
        SpikeLMConfig(**kw)


def test_config_combinations_are_named():
    with pytest.raises(ValueError, match=r"hidden_size \(10\) must be divisible by num_attention_heads \(4\)"):
        SpikeLMConfig(**dict(SMALL_BASE, hidden_size=10, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"hidden_size / num_attention_heads must be even.*head dim 3"):
        SpikeLMConfig(**dict(SMALL_BASE, hidden_size=6, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"block_types must list one type per layer \(num_hidden_layers=3\)"):
        SpikeLMConfig(**dict(SMALL_BASE, num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"tau=2000.0 with decay_init_range"):
        SpikeLMConfig(**dict(SMALL_BASE, tau=2000.0))
    with pytest.raises(ValueError, match=r"pad_token_id must be None or a token id in \[0, vocab_size=48\)"):
        SpikeLMConfig(**dict(SMALL_BASE, pad_token_id=48))
    SpikeLMConfig(**dict(SMALL_BASE, hidden_size=6, num_attention_heads=2, block_types=["ssm", "ssm"]))  # no attention
    assert SpikeLMConfig(**dict(SMALL_BASE, eos_token_id=[1, 2])).eos_token_id == [1, 2]


SIZE_CAP = {"vocab_size": 4096, "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 256, "mlp_ratio": 8,
            "ssm_expand": 4, "psn_T": 4096, "kernel_size": 64, "sliding_psn_k": 64}


@FUZZ
@given(st.sampled_from(CONFIG_FIELDS), ANY_VALUE, st.sampled_from(["dsn", "lif", "psn", "sliding_psn"]))
def test_any_value_is_refused_by_name_or_runs(field, value, neuron):
    """Whatever a field is set to: a ValueError/TypeError naming it, or a model whose forward runs."""
    kw = {**SMALL_BASE, "neuron_type": neuron, field: value}
    try:
        cfg = SpikeLMConfig(**kw)
    except (ValueError, TypeError) as e:
        assert field in str(e), f"{field}={value!r}: {e}"
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > SIZE_CAP.get(field, math.inf):
        return  # valid, but too big to build here
    _forward_runs(cfg)


# train.py flags ------------------------------------------------------------------------------------
def _argv(tmp_path, *extra) -> list[str]:
    return ["--output_dir", str(tmp_path / "run"), "--train_file", str(tmp_path / "t.txt"), *map(str, extra)]


INVALID_FLAGS = {
    **{k: st.sampled_from(["abc", "1.5", "[1]", "true", "nan"]) for k in (
        "block_size", "per_device_train_batch_size", "gradient_accumulation_steps", "warmup_steps", "max_steps",
        "seed", "save_steps", "logging_steps", "max_consecutive_nonfinite", "streaming_shuffle_buffer",
        "tokenizer_train_documents", "sample_max_new_tokens")},
    **{k: st.sampled_from(["0", "-1", "-100"]) for k in (
        "block_size", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
        "max_consecutive_nonfinite", "tokenizer_train_documents", "streaming_validation_documents", "num_threads",
        "preprocessing_num_workers", "per_device_eval_batch_size", "max_eval_samples", "save_total_limit")},
    **{k: st.sampled_from(["abc", "[0.1]", "true", "nan", "inf", "-inf", "-1"]) for k in (
        "learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm")},
    **{k: st.sampled_from(["abc", "nan", "-0.1", "1", "1.5", "inf"]) for k in ("adam_beta1", "adam_beta2")},
    "validation_split_percentage": st.sampled_from(["-1", "100", "nan", "abc"]),
    "num_train_epochs": st.sampled_from(["0", "-1", "inf", "nan", "abc"]),
    "seed": st.sampled_from(["-1", "4294967296", "abc", "1.5"]),
    "lr_scheduler_type": st.sampled_from(["cosin", "reduce_lr_on_plateau", "warmup_stable_decay", "[cosine]", "1"]),
    "sample_by": st.sampled_from(["word", "lines", "1", "[line]"]),
    "eval_steps": st.sampled_from(["-1", "abc", "1.5"]),
    "warmup_steps": st.sampled_from(["-1", "-10"]),
    "save_steps": st.sampled_from(["-1"]),
    "vocab_size": st.sampled_from(["100", "0", "abc", "257", "2147483648"]),
    "streaming": st.sampled_from(["maybe", "2", "[true]"]),
    "text_column": st.sampled_from(["", "[a]"]),
    "num_threads": st.sampled_from(["0", "5000", "abc"]),
    # model keys: SpikeLMConfig's own checks, reported as a ConfigError
    "hidden_size": st.sampled_from(["0", "abc", "1.5", "[2]"]),
    "tau": st.sampled_from(["0", "-1", "abc", "nan", "1e6"]),
    "block_types": st.sampled_from(["ssm", "[ssm, mamba]", "5"]),
    "rope_theta": st.sampled_from(["0", "0.5", "abc"]),
}


@FUZZ
@given(st.data())
def test_invalid_flags_are_config_errors_naming_the_flag(tmp_path_factory, data):
    tmp = tmp_path_factory.getbasetemp()
    key = data.draw(st.sampled_from(sorted(INVALID_FLAGS)), label="key")
    value = data.draw(INVALID_FLAGS[key], label="value")
    extra = ["--max_steps", "10"] if key == "streaming" else []
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        parse_args(_argv(tmp, f"--{key}", value, *extra))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(sorted(set(all_keys()) - {"config"})),
                          st.one_of(st.text(max_size=6), st.sampled_from(
                              ["0", "-1", "1e-3", "null", "true", "[ssm, attention]", "{a: 1}", "nan", "1e400",
                               "99999999999999999999", "cosine", "bf16", "line", ":", "- x", "!!python/none"]))),
                min_size=1, max_size=3))
def test_any_flags_parse_or_raise_config_error(tmp_path_factory, pairs):
    """Whatever the flags: parse_args returns TrainArgs or raises ConfigError, never another exception."""
    argv = _argv(tmp_path_factory.getbasetemp())
    for k, v in pairs:
        argv += [f"--{k}={v}"]
    try:
        args = parse_args(argv)
    except ConfigError:
        return
    assert isinstance(args, TrainArgs)


@settings(FUZZ, max_examples=60)
@given(lr=st.one_of(st.floats(1e-8, 10), st.just("3e-4")), wd=st.floats(0, 1), b1=st.floats(0, 0.9999),
       b2=st.floats(0, 0.9999), eps=st.floats(0, 1e-3), clip=st.floats(0, 10), sched=st.sampled_from(LR_SCHEDULERS),
       warmup=st.integers(0, 20), steps=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_accepted_optimizer_flags_build_adamw_and_scheduler(tmp_path_factory, lr, wd, b1, b2, eps, clip, sched,
                                                            warmup, steps, seed):
    """What validate accepts, torch's AdamW, transformers' get_scheduler and accelerate's set_seed accept too."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    try:
        a = parse_args(_argv(tmp_path_factory.getbasetemp(), "--learning_rate", lr, "--weight_decay", wd,
                             "--adam_beta1", b1, "--adam_beta2", b2, "--adam_epsilon", eps, "--max_grad_norm", clip,
                             "--lr_scheduler_type", sched, "--warmup_steps", warmup, "--max_steps", steps,
                             "--seed", seed))
    except ConfigError as e:  # a combination one of them refuses (polynomial: warmup == max_steps)
        assert "--warmup_steps" in str(e) and sched == "polynomial" and warmup == steps, e
        return
    set_seed(a.seed)
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamw([{"params": [p]}], lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
                weight_decay=a.weight_decay)  # train.py's optimizer
    scheduler = get_scheduler(a.lr_scheduler_type, opt, num_warmup_steps=a.warmup_steps, num_training_steps=a.max_steps)
    for _ in range(2):
        p.grad = torch.ones(3)
        torch.nn.utils.clip_grad_norm_([p], a.max_grad_norm)
        opt.step()
        scheduler.step()
    assert all(math.isfinite(lr) for lr in scheduler.get_last_lr())
