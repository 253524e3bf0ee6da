"""SpikeLMModel and SpikeLMForCausalLM: a Hugging Face model over the spiking blocks.

The prompt runs in parallel (scans); generation then steps one token at a time through a
SpikeLMCache whose size does not depend on the text length. Works with `generate()` of
transformers 5.17 (cache kwarg `past_key_values`) and later 5.x (`cache`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from dataclasses import field, make_dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.utils import ModelOutput, logging

from ..layers import (NeuronLayer, RMSNorm, SequenceContext, SpikeLinear, SpikingAttentionBlock, SpikingSSMBlock,
                      set_sparse_mode, set_sparse_training)
from ..neurons import DSN, PSN, SlidingPSN
from .cache import SpikeLMCache
from .configuration_spikelm import SpikeLMConfig
from .model_card import model_card
from .remote_code import AUTO_MAP, in_package, write_remote_code

logger = logging.get_logger(__name__)

# transformers renamed the generation cache kwarg from `past_key_values` to `cache` (after 5.17)
CACHE_NAME = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"


def _output_class(name: str, fields: list[str]) -> type:
    """A ModelOutput dataclass whose cache field carries the name this transformers version expects."""
    return make_dataclass(name, [(f, Any, field(default=None)) for f in fields], bases=(ModelOutput,))


SpikeLMModelOutput = _output_class("SpikeLMModelOutput", ["last_hidden_state", CACHE_NAME, "hidden_states", "firing_loss"])
SpikeLMCausalLMOutput = _output_class("SpikeLMCausalLMOutput",
                                      ["loss", "logits", CACHE_NAME, "hidden_states", "firing_loss"])


def _rotate(x: torch.Tensor, shift: torch.Tensor, back: bool = False) -> torch.Tensor:
    """Rotate each row of x [B, T, ...] right by shift[b] positions along T (back=True undoes it)."""
    T = x.shape[1]
    idx = torch.arange(T, device=x.device)[None, :] + (shift[:, None] if back else -shift[:, None])
    idx = idx.remainder(T)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


# forward kwargs that Hugging Face code passes and that change nothing here
_IGNORED_KWARGS = ("cache_position", "num_items_in_batch", "token_type_ids", "output_attentions", "use_return_dict")


def _check_kwargs(kwargs: dict, config) -> None:
    """Refuse what the model cannot honour; drop the standard kwargs that do not apply; warn once about the rest."""
    wants_attentions = kwargs.get("output_attentions")
    if wants_attentions is None:
        wants_attentions = getattr(config, "output_attentions", False)
    if wants_attentions:
        raise ValueError("output_attentions=True: SpikeLM cannot return attention weights (its attention blocks run "
                         "windowed attention over spike trains without materialising them); call it with "
                         "output_attentions=False")
    for name in _IGNORED_KWARGS:
        kwargs.pop(name, None)
    if kwargs:
        logger.warning_once(f"SpikeLM ignores the forward arguments {sorted(kwargs)}")
        kwargs.clear()


def _one_cache(cache, past_key_values):
    """The cache under either of its names (`cache` in transformers after 5.17, `past_key_values` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the generation cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class SpikeLMPreTrainedModel(PreTrainedModel):
    config_class = SpikeLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SpikingSSMBlock", "SpikingAttentionBlock"]
    _is_stateful = True
    # attention blocks run the same windowed attention either way: "sdpa" through
    # F.scaled_dot_product_attention, "eager" as explicit matmul + softmax
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """save_pretrained, plus what `trust_remote_code=True` needs to load the folder without spikelm installed
        (`auto_map` in config.json and the modeling code, generated from the package: models/remote_code.py) and a
        model card (README.md) unless the folder has one."""
        if in_package():
            self.config.auto_map = dict(AUTO_MAP)
        out = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            if in_package():
                write_remote_code(save_directory)
            card = Path(save_directory) / "README.md"
            if not card.exists():  # train.py writes a fuller card (data, tokens seen, validation) over it
                tmp = card.with_name(".README.md.tmp")
                tmp.write_text(model_card(self.config, self.num_parameters()), encoding="utf-8")
                os.replace(tmp, card)
        return out

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # SpikeLMCache is made in prepare_inputs_for_generation

    def op_counts(self, inputs) -> dict:
        """Energy accounting (spikelm.eval.energy): no arithmetic of its own; its submodules count theirs."""
        return {}

    def _init_weights(self, module: nn.Module) -> None:
        """Through transformers' init helpers, so weights loaded from a checkpoint are never re-initialised."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "feeds_neuron", False):
                # drives a neuron with no norm in between: unit-variance weights per input make the
                # neuron's input about as large as the spikes it reads (firing, not silent, at init)
                std = module.in_features ** -0.5
            elif getattr(module, "is_residual_out", False):
                # projections that write into the residual stream are scaled down with depth (GPT-2)
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.constant_(module.weight, module.init_scale)
        elif isinstance(module, DSN):
            bound = module.conv_weight_bound()
            init.uniform_(module.conv_weight, -bound, bound)
            init.copy_(module.conv_bias, module.initial_decay_bias())
        elif isinstance(module, PSN):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            init.constant_(module.bias, -1.0)
        elif isinstance(module, SlidingPSN):
            init.copy_(module.weight, module.initial_weight())
            init.constant_(module.bias, -1.0)


class SpikeLMModel(SpikeLMPreTrainedModel):
    def __init__(self, config: SpikeLMConfig):
        super().__init__(config)
        kw = config.neuron_kwargs()
        eps = config.rms_norm_eps
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        layers = []
        for block_type in config.block_types:
            if block_type == "ssm":
                core_kw = dict(kw, decay_init_range=tuple(config.core_decay_init_range))
                block = SpikingSSMBlock(config.hidden_size, config.ssm_expand, config.intermediate_size, kw, eps,
                                        core_neuron_kwargs=core_kw, gate=config.ssm_gate)
            else:
                block = SpikingAttentionBlock(config.hidden_size, config.num_attention_heads, config.attention_window,
                                              config.rope_theta, config.intermediate_size, kw, eps)
            layers.append(block)
        self.layers = nn.ModuleList(layers)
        for block in self.layers:
            for name in ("out_proj", "o_proj"):
                if hasattr(block, name):
                    getattr(block, name).is_residual_out = True
            block.mlp.fc2.is_residual_out = True
        # the LM head reads spikes too
        self.final_spikes = NeuronLayer(config.hidden_size, dict(kw, max_spike=config.head_max_spike), eps)
        self.gradient_checkpointing = False
        self._compiled_decode = None  # compile_decoding(): a torch.compile'd one-token step
        self.post_init()

    def compile_decoding(self, **compile_kwargs) -> None:
        """Run one-token decoding steps through torch.compile: every block and the final neuron layer, one graph.

        A decoding step is hundreds of tiny ops (each neuron's conv taps, decay, membrane and spike), so
        eager PyTorch spends it in per-op overhead; Inductor fuses the elementwise work into a few
        kernels, and one graph for the whole step pays one guard check per token. The first steps
        compile (up to a few minutes on a CPU, cached on disk), and once more when the attention
        blocks' KV caches first grow (their length then becomes a dynamic dimension, so filling the
        window does not recompile again). Prefill, training and steps that return every layer's hidden
        states stay eager. Decoding agrees with eager decoding to float32 rounding. compile_kwargs go
        to torch.compile. For a model on CPU when this is called, unless they choose the backend, mode
        or options, Inductor writes the step's wrapper in C++ (cpp_wrapper): its Python wrapper costs
        microseconds per kernel launch and per custom-op call, a large share of a small model's step
        once the weights are read sparsely.
        """
        if not {"backend", "mode", "options"} & compile_kwargs.keys() and self.embed_tokens.weight.device.type == "cpu":
            compile_kwargs["options"] = {"cpp_wrapper": True}
        self._compiled_decode = torch.compile(self._decode_layers, **compile_kwargs)

    def _decode_layers(self, hidden: torch.Tensor, ctx: SequenceContext, states: list, final_state):
        """One decoding step through every block and the final neuron layer (compile_decoding compiles
        this whole loop as one graph: one guard check per token instead of one per block)."""
        new_states = []
        for layer, state in zip(self.layers, states):
            hidden, new_state = layer(hidden, ctx, state, True)
            new_states.append(new_state)
        spikes, final_state = self.final_spikes(hidden, ctx, final_state, True)
        return hidden, new_states, spikes, final_state

    def _firing_loss(self, totals: list) -> torch.Tensor:
        """Mean spike count per neuron-step over all neuron layers (each layer weighted by its neuron-steps),
        counting only what a layer fires above firing_loss_target per neuron-step."""
        target = self.config.firing_loss_target
        excess = sum((spikes - target * steps).clamp(min=0) for spikes, steps in totals)
        return excess / sum(steps for _, steps in totals)

    def _checkpointed(self, layer, hidden, ctx: SequenceContext, state, use_cache: bool):
        """layer(...) with activation checkpointing. The firing loss's spike sums leave the layer as an output
        (not through ctx's list): reentrant checkpointing runs the layer without a graph, so only its
        outputs carry gradients."""
        if ctx.spike_totals is None:
            return self._gradient_checkpointing_func(layer.__call__, hidden, ctx, state, use_cache)
        inner = replace(ctx, spike_totals=[])

        def run(h):
            inner.spike_totals.clear()  # (filled again when the backward recomputes the layer)
            out, new_state = layer(h, inner, state, use_cache)
            return out, new_state, torch.stack([spikes for spikes, _ in inner.spike_totals])

        hidden, new_state, spikes = self._gradient_checkpointing_func(run, hidden)
        ctx.spike_totals.extend(zip(spikes.unbind(), [steps for _, steps in inner.spike_totals]))
        return hidden, new_state

    def _attention_implementation(self) -> str:
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"attn_implementation={impl!r}: SpikeLM's attention blocks run 'eager' or 'sdpa'")
        return impl

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @property
    def supports_cache(self) -> bool:
        """PSN neurons have no serial form: a PSN model recomputes the whole text at every token."""
        return self.config.neuron_type != "psn"

    # -- input checks and token layout ---------------------------------------------------------
    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = hi if hi >= self.config.vocab_size else lo
                raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")

    @staticmethod
    def _packed_layout(B: int, T: int, position_ids, cu_seqlens, device):
        """Flatten [B, T] rows of packed documents into one row: (cu_seqlens, positions [1, BT], doc_ids [1, BT])."""
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens needs the packed documents in one row (batch size 1), got batch size {B}")
            cu = cu_seqlens.to(device=device, dtype=torch.long)
            if cu.dim() != 1 or cu.numel() < 2 or cu[0] != 0 or cu[-1] != T or (cu.diff() < 0).any():
                raise ValueError(f"cu_seqlens must rise from 0 to seq_len={T}, got {cu.tolist()}")
        else:
            starts = position_ids.reshape(-1) == 0
            starts[:: T] = True  # every row starts a document
            idx = torch.nonzero(starts).flatten()
            cu = torch.cat([idx, torch.tensor([B * T], device=device)])
        lengths = cu.diff()
        doc_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=B * T)
        positions = torch.arange(B * T, device=device) - torch.repeat_interleave(cu[:-1], lengths, output_size=B * T)
        return cu, positions[None], doc_ids[None]

    @staticmethod
    def _padding(attention_mask, B: int, T: int, cache, need_state: bool):
        """The chunk's padding: (valid [B, T] bool or None when every position is a token, shift [B] or None).

        A row's tokens may be padded on either side. Outputs at token positions never depend on padding:
        padded inputs are zeroed, which leaves a fresh neuron fresh, and attention never reads a padded
        key. When the state after the chunk is needed (use_cache), a row with padding after its tokens is
        rotated so the padding comes first (shift = its trailing padding): the state then ends at its last
        token, and the outputs are rotated back.
        """
        if attention_mask is None:
            return None, None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
            raise ValueError(f"attention_mask must have shape [batch={B}, seq_len={T}] (or cover the cached tokens "
                             f"too), got {tuple(attention_mask.shape)}")
        chunk = attention_mask[:, -T:].bool()
        if bool(chunk.all()):
            return None, None
        edges = chunk[:, 1:].int() - chunk[:, :-1].int()
        runs = (edges == 1).sum(1) + chunk[:, 0].int()  # starts of runs of tokens
        if bool((runs > 1).any()):
            row = int((runs > 1).nonzero()[0])
            raise ValueError(f"attention_mask row {row} has padding between tokens: a row's tokens must be one contiguous "
                             "run, padded before and/or after it")
        if cache is not None and cache.positions is not None:
            resumed = (cache.positions.to(chunk.device) > 0) & ~chunk.all(1)
            if bool(resumed.any()):
                raise ValueError(f"attention_mask pads row {int(resumed.nonzero()[0])}, which continues a cache: padding "
                                 "is only allowed before a row's first token and after its last one in the same call "
                                 "(feed a continued row's new tokens without padding)")
        shift = None
        if need_state:
            last = torch.where(chunk, torch.arange(T, device=chunk.device), -1).max(1).values
            trailing = torch.where(last >= 0, T - 1 - last, 0)
            if bool(trailing.any()):
                shift = trailing
                chunk = _rotate(chunk, shift)
        return chunk, shift

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cu_seqlens=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, return_dict=None, cache=None, past_key_values=None,
                **kwargs):
        cache = _one_cache(cache, past_key_values)
        _check_kwargs(kwargs, self.config)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            self._check_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids.long())
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must have shape [batch, seq_len, {self.config.hidden_size}], "
                             f"got {tuple(inputs_embeds.shape)}")
        B, T = inputs_embeds.shape[:2]
        if T == 0:
            raise ValueError("the input is empty (seq_len 0): give at least one token")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        packed = cu_seqlens is not None or (
            position_ids is not None and T > 1 and bool((position_ids[:, 1:] == 0).any()))
        if use_cache and not self.supports_cache:
            use_cache = False
        if cache is not None and not self.supports_cache:
            raise ValueError("a PSN model keeps no generation state: call it without a cache")

        shift = None
        if packed:
            if cache is not None:
                raise ValueError("packed documents (cu_seqlens / position_ids restarting at 0) cannot continue a cache")
            if attention_mask is not None and not attention_mask.bool().all():
                raise ValueError("packed documents take no padding: attention_mask must be all ones")
            cu, positions, doc_ids = self._packed_layout(B, T, position_ids, cu_seqlens, inputs_embeds.device)
            ctx = SequenceContext(valid=None, positions=positions, cu_seqlens=cu, doc_ids=doc_ids,
                                  attention=self._attention_implementation())
            hidden = inputs_embeds.reshape(1, B * T, -1)
            use_cache = False
        else:
            if use_cache and cache is None:
                cache = SpikeLMCache(self.config)
            valid, shift = self._padding(attention_mask, B, T, cache, use_cache)
            if self.config.neuron_type == "psn" and valid is not None and bool((valid[:, 1:] > valid[:, :-1]).any()):
                raise ValueError("a PSN model cannot take padding before a row's tokens: PSN weights are tied to "
                                 "absolute time steps (pad on the right instead)")
            if cache is not None and cache.positions is not None and cache.batch_size != B:
                raise ValueError(f"the cache holds {cache.batch_size} rows but the input has batch size {B}")
            start = cache.positions if cache is not None and cache.positions is not None else \
                torch.zeros(B, dtype=torch.long, device=inputs_embeds.device)
            if shift is not None:
                inputs_embeds = _rotate(inputs_embeds, shift)
                position_ids = None if position_ids is None else _rotate(position_ids, shift)
            if position_ids is not None:
                positions = position_ids.to(torch.long)
            elif valid is None:
                positions = start[:, None] + torch.arange(T, device=inputs_embeds.device)
            else:
                positions = start[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)
            ctx = SequenceContext(valid=valid, positions=positions, attention=self._attention_implementation())
            hidden = inputs_embeds
        if self.config.firing_loss_coef > 0 and self.training and torch.is_grad_enabled():
            ctx.spike_totals = []

        all_hidden = [] if output_hidden_states else None
        if (self._compiled_decode is not None and T == 1 and cache is not None and use_cache
                and all_hidden is None and not torch.is_grad_enabled()):
            hidden, states, spikes, final_state = self._compiled_decode(hidden, ctx, [l.state for l in cache.layers],
                                                                        cache.final)
            for layer_cache, state in zip(cache.layers, states):
                layer_cache.state = state
        else:
            for i, layer in enumerate(self.layers):
                if all_hidden is not None:
                    all_hidden.append(hidden.reshape(B, T, -1))
                state = cache.layers[i].state if cache is not None else None
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    hidden, new_state = self._checkpointed(layer, hidden, ctx, state, use_cache)
                else:
                    hidden, new_state = layer(hidden, ctx, state, use_cache)
                if use_cache:
                    cache.layers[i].state = new_state
            spikes, final_state = self.final_spikes(hidden, ctx, cache.final if use_cache else None, use_cache)
        if use_cache:
            cache.final = final_state
            n_new = ctx.valid.long().sum(1) if ctx.valid is not None else T  # an int: no tensor built per step
            if cache.positions is None:
                cache.positions = torch.zeros(B, dtype=torch.long, device=hidden.device)
            cache.positions = cache.positions + n_new
            cache.length += T
        if packed:
            hidden, spikes = hidden.reshape(B, T, -1), spikes.reshape(B, T, -1)
        if all_hidden is not None:
            all_hidden.append(hidden.reshape(B, T, -1))
        if shift is not None:  # rows rotated for their state: back to the caller's layout
            spikes = _rotate(spikes, shift, back=True)
            all_hidden = None if all_hidden is None else [_rotate(h, shift, back=True) for h in all_hidden]
        out = SpikeLMModelOutput(last_hidden_state=spikes, hidden_states=tuple(all_hidden) if all_hidden else None)
        if ctx.spike_totals:
            out["firing_loss"] = self._firing_loss(ctx.spike_totals)
        if use_cache:
            out[CACHE_NAME] = cache
        return out if return_dict is not False else out.to_tuple()


class SpikeLMForCausalLM(SpikeLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # the loss is a mean over this batch's tokens: HF Trainer must still divide by accumulation steps
    accepts_loss_kwargs = False

    def __init__(self, config: SpikeLMConfig):
        super().__init__(config)
        self.model = SpikeLMModel(config)
        self.lm_head = SpikeLinear(config.hidden_size, config.vocab_size, bias=False)  # reads the final spikes
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def compile_decoding(self, **compile_kwargs) -> None:
        """torch.compile the one-token decoding steps (see SpikeLMModel.compile_decoding)."""
        self.model.compile_decoding(**compile_kwargs)

    def set_sparse_inference(self, mode: str = "auto", int8: bool = False) -> None:
        """How every spike-fed linear layer (the blocks' projections and the LM head) multiplies in CPU inference.

        "auto" (the default): the event-driven product (ops.spike_linear: only the weights of the inputs
        that fired are read) on decoding steps, per call, when the input's measured density is at most the
        layer's crossover; "on": always that product (CPU, no gradient); "off": always dense F.linear.
        Gradients and GPUs are always dense here (training on CPU: set_sparse_training). The products agree
        to float32 rounding, so greedy decoding gives the same tokens in every mode unless a spike or an argmax sits on a rounding tie.
        int8=True: the event-driven product reads int8 weights with one scale per output feature (a
        quantised copy: perplexity changes slightly; see docs/sparse-inference.md). generate(),
        StreamingGenerator and the compiled decoding step follow the mode set here (a change recompiles
        the step once).
        """
        set_sparse_mode(self, mode, int8)

    def set_sparse_training(self, enabled: bool = True) -> None:
        """Whether training on CPU runs the spike-fed linear layers through ops.spike_matmul (default True): their
        forward and weight gradient walk only the inputs that fired, where few enough did, with results equal
        to the dense products' up to float32 rounding. False: always the dense products."""
        set_sparse_training(self, enabled)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cu_seqlens=None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, return_dict=None, logits_to_keep=0,
                cache=None, past_key_values=None, **kwargs):
        """Causal LM forward. labels [B, T] are shifted inside (position t predicts token t+1); -100 is ignored,
        and so are padded positions. logits_to_keep=n keeps the logits of the last n positions only."""
        cache = _one_cache(cache, past_key_values)
        _check_kwargs(kwargs, self.config)
        if return_dict is None:
            return_dict = self.config.return_dict
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cu_seqlens=cu_seqlens, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, return_dict=True, **{CACHE_NAME: cache})
        spikes = out.last_hidden_state
        loss = None
        if labels is not None:
            if labels.shape != spikes.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(spikes.shape[:2])}, got {tuple(labels.shape)}")
            logits_all = self.lm_head(spikes)
            # the targets shift left (the last position predicts nothing): slicing the logits instead would
            # copy them, and its backward would zero-fill and copy a [B, T, vocab] gradient
            targets = F.pad(labels[:, 1:].long(), (0, 1), value=-100)
            if attention_mask is not None:
                targets = targets.masked_fill(~attention_mask[:, -labels.shape[1]:].bool().roll(-1, dims=1), -100)
            loss = F.cross_entropy(logits_all.float().reshape(-1, logits_all.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100)
            if out.firing_loss is not None:
                loss = loss + self.config.firing_loss_coef * out.firing_loss
            logits = logits_all if not logits_to_keep else logits_all[:, -logits_to_keep:]
        else:
            kept = spikes if not logits_to_keep else spikes[:, -logits_to_keep:]
            logits = self.lm_head(kept)
        result = SpikeLMCausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                       firing_loss=out.firing_loss)
        if out.get(CACHE_NAME) is not None:
            result[CACHE_NAME] = out[CACHE_NAME]
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, use_cache=True,
                                      cache=None, past_key_values=None, **kwargs):
        """Only the tokens the cache has not seen go through the model: the whole prompt once (in parallel),
        then one new token per step."""
        cache = _one_cache(cache, past_key_values)
        use_cache = bool(use_cache) and self.model.supports_cache
        if use_cache and cache is None:
            cache = SpikeLMCache(self.config)
        inputs = {}
        if use_cache and cache.length > 0:
            # generate() keeps the prompt embeds out of input_ids, so slice by the ids already consumed
            inputs["input_ids"] = input_ids[:, cache.input_ids_consumed:]
        elif inputs_embeds is not None and (cache is None or cache.length == 0):
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids
        if cache is not None:
            cache.input_ids_consumed = input_ids.shape[1]
        inputs["attention_mask"] = attention_mask
        inputs["use_cache"] = use_cache
        if use_cache:
            inputs[CACHE_NAME] = cache
        for key in ("logits_to_keep", "output_hidden_states", "return_dict"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs
