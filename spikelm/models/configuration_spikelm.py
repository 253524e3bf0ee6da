"""SpikeLMConfig: every field of a SpikeLM model, validated with errors that name the field."""
from __future__ import annotations

import math

from transformers import PreTrainedConfig

from ..neurons import NEURON_TYPES, SPIKE_MODES, SURROGATES

BLOCK_TYPES = ("ssm", "attention")
SSM_GATES = ("binary", "integer", "none")

# Config versions: the defaults of the fields below changed between versions. SpikeLMConfig(...) builds
# the current version; a serialized config without `config_version` (a config.json saved before it
# existed) is version 1 and gets version 1's defaults, so an old model loads and runs as trained.
class SameAs:
    """A default that copies another field's value."""

    def __init__(self, field: str):
        self.field = field


CONFIG_VERSION = 2
# version 2's changes measured on configs/tiny.yaml's model (benchmarks/ablate.py, docs/results.md): the atan
# surrogate for every neuron and an integer-spiking SSM gate each lower the held-out loss, together most
VERSIONED_DEFAULTS = {
    1: {"surrogate": "rect", "head_max_spike": SameAs("max_spike"), "core_decay_init_range": SameAs("decay_init_range"),
        "ssm_gate": "binary", "neuron_input_scale": 2.0},
    2: {"surrogate": "atan", "head_max_spike": SameAs("max_spike"), "core_decay_init_range": SameAs("decay_init_range"),
        "ssm_gate": "integer", "neuron_input_scale": 2.0},
}


def default_block_types(num_hidden_layers: int) -> list[str]:
    """The hybrid default: spiking SSM blocks with a spiking attention block as every fourth layer."""
    return ["attention" if i % 4 == 3 else "ssm" for i in range(num_hidden_layers)]


class SpikeLMConfig(PreTrainedConfig):
    r"""Configuration of a SpikeLM model.

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: width of the residual stream.
        num_hidden_layers: number of blocks.
        block_types: "ssm" (spiking SSM block) or "attention" (spiking Transformer block) per layer;
            default: SSM with attention as every fourth layer.
        neuron_type: "dsn" (default) or a baseline, "lif", "psn", "sliding_psn", used in every layer.
        tau, kernel_size, max_spike, spike_mode: the DSN's settings (see spikelm.neurons.DSN).
        surrogate: the spike function's backward, "rect" (a window around each threshold) or "atan"
            (default from version 2: its gradient also reaches neurons held below 0).
        surrogate_alpha: sharpness of the atan surrogate (the SSM's binary gate always uses atan): its
            gradient reaches ~1/alpha around each threshold, so a smaller alpha also reaches neurons
            held below 0, which the rect surrogate never updates. Backward only: a trained model's
            outputs do not depend on it.
        decay_init_range: (short, long) initial decays of every DSN layer's channels, spread
            log-uniformly in 1 - alpha; the decays stay input-dependent and learn from there.
        psn_T: the time window of PSN neurons (inputs longer than this are an error for PSN).
        sliding_psn_k: taps of sliding-PSN neurons. lif_beta, lif_reset: LIF decay and reset.
        ssm_expand: inner width of the SSM core = ssm_expand * hidden_size.
        mlp_ratio: MLP width = mlp_ratio * hidden_size (or intermediate_size when given).
        num_attention_heads: heads of attention blocks (hidden_size must divide by it; head dim even).
        attention_window: tokens each token attends to (itself included): bounds the KV cache;
            None is full attention, whose cache grows with the text.
        rope_theta: rotary base. rms_norm_eps: epsilon of the RMS norms.
        tie_word_embeddings: the LM head shares the embedding matrix.
        initializer_range: std of the normal init of linear and embedding weights.
        use_cache: return the O(1) generation cache by default.
        max_position_embeddings: the longest input tools should assume (lm-evaluation-harness, pipelines
            read it). SpikeLM has no positional limit: rotary positions, the DSN state and a windowed
            attention run at any length, and streaming (generate, StreamingGenerator) keeps O(1) memory;
            only one parallel forward's activations grow with its length. Default 2^20.
        firing_loss_coef: weight of the firing loss added to the training loss (0: none): the mean
            spike count per neuron per step over every neuron layer, i.e. the binary spike events
            an integer spike S unfolds into (S events), which is what synaptic operations and the
            energy estimate count. Pushes the model to carry its information in fewer spikes
            (like the auxiliary router loss of MoE models); only added in training mode.
        firing_loss_target: per neuron layer, the mean spike count per neuron-step below which the
            firing loss stops pushing (0: none). Without it the loss can silence whole sub-layers:
            a neuron held below 0 gets no gradient from the rect surrogate and never recovers.
        config_version: which version's defaults surrogate and the fields below take when not given
            (default: the current one, CONFIG_VERSION). A saved config without it is version 1.
        head_max_spike: N of the neuron layer the LM head reads (the last one); default: max_spike.
        core_decay_init_range: decay_init_range of the SSM blocks' core neurons (the state that carries
            context); default: decay_init_range.
        ssm_gate: the SSM block's gate on its core's spikes: "binary" (0/1 spikes, atan surrogate),
            "integer" (spikes 0..N like the core, with its surrogate; default from version 2), or "none"
            (no gate: in_proj feeds the core only).
        neuron_input_scale: initial gain of the RMSNorm in front of every neuron that reads the
            residual stream: the RMS of the membrane's drive, against the spike thresholds 1/2, 3/2, ...
    """

    model_type = "spikelm"

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 512, num_hidden_layers: int = 8,
                 block_types: list[str] | None = None, neuron_type: str = "dsn", tau: float = 0.25,
                 kernel_size: int = 4, max_spike: int = 4, spike_mode: str = "integer", surrogate: str | None = None,
                 surrogate_alpha: float = 2.0,
                 decay_init_range: tuple[float, float] | list[float] = (0.05, 0.5),
                 psn_T: int = 2048, sliding_psn_k: int = 4, lif_beta: float = 0.5, lif_reset: str = "hard",
                 ssm_expand: int = 2, mlp_ratio: int = 4, intermediate_size: int | None = None,
                 num_attention_heads: int = 8, attention_window: int | None = 2048, rope_theta: float = 10000.0,
                 rms_norm_eps: float = 1e-5, tie_word_embeddings: bool = True, initializer_range: float = 0.02,
                 use_cache: bool = True, max_position_embeddings: int = 1 << 20, firing_loss_coef: float = 0.0,
                 firing_loss_target: float = 0.0, config_version: int | None = None,
                 head_max_spike: int | None = None, core_decay_init_range: list[float] | None = None,
                 ssm_gate: str | None = None, neuron_input_scale: float | None = None,
                 pad_token_id: int | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.block_types = block_types
        self.neuron_type = neuron_type
        self.tau = tau
        self.kernel_size = kernel_size
        self.max_spike = max_spike
        self.spike_mode = spike_mode
        self.surrogate_alpha = surrogate_alpha
        self.decay_init_range = list(decay_init_range) if isinstance(decay_init_range, (list, tuple)) else decay_init_range
        self.psn_T = psn_T
        self.sliding_psn_k = sliding_psn_k
        self.lif_beta = lif_beta
        self.lif_reset = lif_reset
        self.ssm_expand = ssm_expand
        self.mlp_ratio = mlp_ratio
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.attention_window = attention_window
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.max_position_embeddings = max_position_embeddings
        self.firing_loss_coef = firing_loss_coef
        self.firing_loss_target = firing_loss_target
        v = CONFIG_VERSION if config_version is None else config_version
        if isinstance(v, bool) or not isinstance(v, int) or v not in VERSIONED_DEFAULTS:
            raise ValueError(f"SpikeLMConfig.config_version must be one of {sorted(VERSIONED_DEFAULTS)}, "
                             f"got {config_version!r}")
        self.config_version = v
        given = {"surrogate": surrogate, "head_max_spike": head_max_spike,
                 "core_decay_init_range": core_decay_init_range,
                 "ssm_gate": ssm_gate, "neuron_input_scale": neuron_input_scale}
        for name, value in given.items():
            if value is None:
                value = VERSIONED_DEFAULTS[v][name]
                if isinstance(value, SameAs):
                    value = getattr(self, value.field)
            setattr(self, name, list(value) if isinstance(value, (list, tuple)) else value)
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        self._validate()

    def _validate(self) -> None:
        """Check every field (a ValueError or TypeError naming it); then fill the defaults that derive from
        other fields (block_types, intermediate_size), once those fields are known to be valid."""
        def number(v):
            return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SpikeLMConfig.{name} must be an integer >= 1, got {v!r}")

        def positive_float(name):
            v = getattr(self, name)
            if not number(v) or v <= 0:
                raise ValueError(f"SpikeLMConfig.{name} must be a finite number > 0, got {v!r}")

        def choice(name, options):
            v = getattr(self, name)
            if not isinstance(v, str) or v not in options:
                raise ValueError(f"SpikeLMConfig.{name} must be one of {options}, got {v!r}")

        def flag(name):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SpikeLMConfig.{name} must be true or false, got {getattr(self, name)!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "kernel_size", "max_spike", "psn_T",
                     "sliding_psn_k", "ssm_expand", "mlp_ratio", "num_attention_heads", "max_position_embeddings"):
            positive_int(name)
        if self.intermediate_size is None:
            self.intermediate_size = self.mlp_ratio * self.hidden_size
        positive_int("intermediate_size")
        positive_int("head_max_spike")
        for name in ("tau", "rope_theta", "rms_norm_eps", "initializer_range", "surrogate_alpha", "neuron_input_scale"):
            positive_float(name)
        if self.rope_theta < 1:  # a base below 1 turns the rotary frequencies upside down (and overflows them)
            raise ValueError(f"SpikeLMConfig.rope_theta must be >= 1 (the rotary base; 10000 is usual), "
                             f"got {self.rope_theta!r}")
        for name in ("firing_loss_coef", "firing_loss_target"):
            c = getattr(self, name)
            if not number(c) or c < 0:
                raise ValueError(f"SpikeLMConfig.{name} must be a finite number >= 0, got {c!r}")
        choice("neuron_type", NEURON_TYPES)
        choice("spike_mode", SPIKE_MODES)
        choice("surrogate", SURROGATES)
        choice("lif_reset", ("hard", "soft"))
        flag("tie_word_embeddings")
        flag("use_cache")
        choice("ssm_gate", SSM_GATES)
        for name in ("decay_init_range", "core_decay_init_range"):
            r = getattr(self, name)
            if not isinstance(r, list) or len(r) != 2 or not all(number(v) for v in r) or not 0 < r[0] <= r[1] < 1:
                raise ValueError(f"SpikeLMConfig.{name} must be [short, long] with 0 < short <= long < 1, got {r!r}")
            for alpha in r:
                # the DSN's initial conv bias is logit(alpha ** tau): it must be finite for every initial decay
                p = alpha ** self.tau
                if not 0 < p < 1:
                    raise ValueError(f"SpikeLMConfig.tau={self.tau!r} with {name}={r!r}: the initial decay "
                                     f"{alpha} needs sigmoid(bias) = {alpha}**tau, which rounds to {p!r}; choose tau "
                                     "nearer 1 (the paper uses 0.25) or a range further from 0 and 1")
        if not number(self.lif_beta) or not 0 <= self.lif_beta < 1:
            raise ValueError(f"SpikeLMConfig.lif_beta must lie in [0, 1), got {self.lif_beta!r}")
        if self.block_types is None:
            self.block_types = default_block_types(self.num_hidden_layers)
        if isinstance(self.block_types, str) or not isinstance(self.block_types, (list, tuple)):
            raise TypeError(f"SpikeLMConfig.block_types must be a list of {BLOCK_TYPES}, one per layer, "
                            f"got {self.block_types!r}")
        self.block_types = list(self.block_types)
        if len(self.block_types) != self.num_hidden_layers:
            raise ValueError(f"SpikeLMConfig.block_types must list one type per layer "
                             f"(num_hidden_layers={self.num_hidden_layers}), got {len(self.block_types)}")
        for i, t in enumerate(self.block_types):
            if not isinstance(t, str) or t not in BLOCK_TYPES:
                raise ValueError(f"SpikeLMConfig.block_types[{i}] must be one of {BLOCK_TYPES}, got {t!r}")
        if "attention" in self.block_types:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"SpikeLMConfig.hidden_size ({self.hidden_size}) must be divisible by "
                                 f"num_attention_heads ({self.num_attention_heads})")
            if (self.hidden_size // self.num_attention_heads) % 2:
                raise ValueError(f"SpikeLMConfig.hidden_size / num_attention_heads must be even (the head dim, for "
                                 f"rotary positions), got hidden_size={self.hidden_size}, num_attention_heads="
                                 f"{self.num_attention_heads}: head dim {self.hidden_size // self.num_attention_heads}")
        w = self.attention_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"SpikeLMConfig.attention_window must be an integer >= 1 or None (full attention), got {w!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name, None)
            ids = v if name == "eos_token_id" and isinstance(v, list) else [v]  # several EOS ids are allowed
            if v is not None and not all(not isinstance(i, bool) and isinstance(i, int) and 0 <= i < self.vocab_size
                                         for i in ids):
                raise ValueError(f"SpikeLMConfig.{name} must be None or a token id in [0, vocab_size={self.vocab_size})"
                                 f"{' (or a list of them)' if name == 'eos_token_id' else ''}, got {v!r}")

    @classmethod
    def _dict_from_json_file(cls, json_file):
        return _versioned(super()._dict_from_json_file(json_file))

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        return super().from_dict(_versioned(config_dict), **kwargs)

    def neuron_kwargs(self) -> dict:
        """The settings every NeuronLayer of the model is built with."""
        return dict(neuron_type=self.neuron_type, kernel_size=self.kernel_size, tau=self.tau,
                    max_spike=self.max_spike, spike_mode=self.spike_mode, surrogate=self.surrogate,
                    surrogate_alpha=self.surrogate_alpha,
                    decay_init_range=tuple(self.decay_init_range),
                    psn_T=self.psn_T, sliding_psn_k=self.sliding_psn_k, lif_beta=self.lif_beta,
                    lif_reset=self.lif_reset, input_scale=self.neuron_input_scale)


def _versioned(config_dict: dict) -> dict:
    """A serialized config without config_version was saved before versions existed: version 1."""
    if "config_version" in config_dict:
        return config_dict
    return {**config_dict, "config_version": 1}
