"""The model card (README.md) of a saved model folder: what the model is, how to load it, and, when
training facts are given, what it was trained on and how well it does."""
from __future__ import annotations

import math


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def _architecture_rows(config) -> list[tuple[str, str]]:
    if getattr(config, "model_type", None) != "spikelm":
        return [("architecture", f"`{config.model_type}`"),
                ("layers", str(getattr(config, "num_hidden_layers", "?"))),
                ("hidden size", str(getattr(config, "hidden_size", "?"))),
                ("vocabulary", str(getattr(config, "vocab_size", "?")))]
    blocks = list(config.block_types)
    kinds = ", ".join(f"{blocks.count(k)} {k}" for k in dict.fromkeys(blocks))
    rows = [("layers", f"{config.num_hidden_layers} ({kinds}: {', '.join(blocks)})"),
            ("hidden size", str(config.hidden_size)),
            ("neuron", f"`{config.neuron_type}`, spikes {config.spike_mode} in 0..{config.max_spike}"),
            ("vocabulary", str(config.vocab_size))]
    if "attention" in blocks:
        window = config.attention_window
        rows.append(("attention", f"{config.num_attention_heads} heads, "
                                  + (f"window {window} tokens" if window else "full (cache grows with the text)")))
    if getattr(config, "firing_loss_coef", 0):
        rows.append(("firing loss", f"coefficient {config.firing_loss_coef}, target {config.firing_loss_target}"))
    return rows


def _training_rows(t: dict) -> list[tuple[str, str]]:
    rows = []
    if t.get("data"):
        data = t["data"] if isinstance(t["data"], (list, tuple)) else [t["data"]]
        rows.append(("data", ", ".join(f"`{d}`" for d in data)))
    rows.append(("data license", t.get("data_license") or "not recorded: check the license of the training data"))
    if t.get("tokens_seen") is not None:
        rows.append(("tokens seen", f"{t['tokens_seen']:,}"))
    if t.get("steps") is not None:
        of = f" of {t['max_steps']}" if t.get("max_steps") else ""
        rows.append(("optimizer steps", f"{t['steps']}{of}"))
    v = t.get("validation")
    if v:
        ppl = v.get("perplexity", math.exp(min(v["loss"], 50.0)))
        on = f" on {v['blocks']} blocks" if v.get("blocks") else ""
        rows.append(("validation loss", f"{v['loss']:.4f} (perplexity {ppl:.2f}){on}"))
    else:
        rows.append(("validation loss", "not measured"))
    rate, where = (v.get("firing_rate"), "on validation") if v else (t.get("train_firing_rate"), "in training")
    if rate is not None and not math.isnan(rate):
        rows.append(("firing rate", f"{rate:.4f} {where} (mean spike / max spike per neuron-step)"))
    if t.get("command"):
        rows.append(("command", f"`{t['command']}`"))
    return rows


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "| --- | --- |"] + [f"| {k} | {v.replace('|', '&#124;')} |" for k, v in rows]


def model_card(config, num_parameters: int, training: dict | None = None) -> str:
    """Markdown for README.md in a saved model folder.

    training (optional), every key optional: data (file names or a dataset name, or a list of them),
    data_license, tokens_seen, steps, max_steps, validation ({loss, perplexity, blocks, firing_rate}),
    train_firing_rate (shown when there is no validation result), command (how it was trained),
    what (e.g. "checkpoint at step 200").
    """
    spikelm = getattr(config, "model_type", None) == "spikelm"
    what = (training or {}).get("what")
    title = "SpikeLM" if spikelm else f"{config.model_type} model"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [spikelm, spiking-neural-network, text-generation]" if spikelm else "tags: [text-generation]",
             "---", "", f"# {title}" + (f" ({what})" if what else ""), ""]
    if spikelm:
        lines += ["A causal language model built on the dynamic decay spiking neuron (DSN): every block talks to the",
                  "next through integer spikes, training runs the neuron as a parallel scan, and generation steps it",
                  "one token at a time with a fixed-size state (memory does not grow with the text).", ""]
    else:
        lines += ["A causal language model trained with SpikeLM's training recipe.", ""]
    lines += ["## Model", ""] + _table([("parameters", f"{_count(num_parameters)} ({num_parameters:,})")]
                                       + _architecture_rows(config)) + [""]
    if training is not None:
        lines += ["## Training", ""] + _table(_training_rows(training)) + [""]
    lines += ["## How to load", ""]
    if spikelm:
        lines += ["With the `spikelm` package installed:", "", "```python",
                  "import spikelm  # registers SpikeLM with the Auto classes",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                  'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", "",
                  "Without it (the modeling code travels in this folder):", "", "```python",
                  "from transformers import AutoModelForCausalLM", "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)',
                  "```", ""]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM", "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")', "```", ""]
    return "\n".join(lines)
