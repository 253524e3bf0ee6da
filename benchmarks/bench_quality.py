"""Language-modelling quality on the benchmark corpus: SpikeLM (DSN, LIF, sliding PSN) against Llama.

One BPE tokenizer trained on the train split; models with (nearly) equal parameter counts, each trained
by train.py's own recipe and loop (`spikelm.training.train_model`: its AdamW parameter groups, warmup +
cosine schedule, clipping, packed blocks whose positions restart at every document) on exactly the same
blocks in the same order (same seed, same token budget); then, on the validation split:
  * perplexity on contiguous blocks of the training length T (the in-distribution number);
  * perplexity by position over whole documents up to 16 x T: SpikeLM runs chunk by chunk
    (T tokens per call) through its O(1) cache, i.e. exactly the streaming model; Llama runs one
    full forward with its own positions (its perplexity past T is expected to blow up, since it
    never saw those rotary positions);
  * firing rates of every spiking model (spikelm.eval.FiringRateMonitor) on the validation blocks.

Corpus: `python benchmarks/build_corpus.py` first (nothing is downloaded here).

    python benchmarks/bench_quality.py                       # all four models, defaults below
    python benchmarks/bench_quality.py --models dsn llama --steps 20   # a smoke run
    python benchmarks/bench_quality.py --summarize           # rebuild table/PNGs from the per-model JSONs

Writes benchmarks/results/quality/<model>.json as each model finishes (a cut-off run still leaves
results), then quality.json, quality.md and PNGs (perplexity by position, training loss).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
MODELS = ("dsn", "dsn_firing_loss", "lif", "sliding_psn", "llama")
LABELS = {"dsn": "SpikeLM DSN", "dsn_firing_loss": "SpikeLM DSN + firing loss", "lif": "SpikeLM LIF",
          "sliding_psn": "SpikeLM sliding PSN", "llama": "Llama"}
FIRING_LOSS_COEF = 0.3  # dsn_firing_loss (README "Results": 0.3 and 1.0 were run, 3 and 30 probed)
FIRING_LOSS_TARGET = 0.0
NEURON = {"dsn": "dsn", "dsn_firing_loss": "dsn", "lif": "lif", "sliding_psn": "sliding_psn"}
DSN_MODELS = ("dsn", "dsn_firing_loss")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ------------------------------------------------------------------------------------------ data
def read_docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def get_tokenizer(args, train_docs):
    from transformers import PreTrainedTokenizerFast

    from spikelm.data import train_bpe_tokenizer

    path = args.work / f"tokenizer_{args.vocab}"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    # a fixed sample of the train split (every document, at most tok_chars characters of each) keeps it quick
    texts = [d["text"][: args.tok_chars] for d in train_docs]
    t0 = time.time()
    tok = train_bpe_tokenizer(texts, args.vocab)
    tok.save_pretrained(path)
    log(f"tokenizer: BPE vocab {len(tok)} trained on {sum(map(len, texts)) / 1e6:.1f} M chars in {time.time() - t0:.0f}s")
    return tok


def token_stream(tok, docs: list[dict], n_tokens: int, seed: int) -> torch.Tensor:
    """Documents in a seeded random order, each followed by EOS, concatenated until n_tokens."""
    return torch.cat([torch.tensor(d, dtype=torch.long) for d in document_ids(tok, docs, n_tokens, seed)])[:n_tokens]


def document_ids(tok, docs: list[dict], n_tokens: int, seed: int) -> list[list[int]]:
    """Token ids of documents in a seeded random order (each + EOS) until they hold n_tokens."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out, total, eos = [], 0, tok.eos_token_id
    batch = 256
    for i in range(0, len(order), batch):
        enc = tok([docs[j]["text"] for j in order[i:i + batch]], add_special_tokens=False)["input_ids"]
        for e in enc:
            out.append(e + [eos])
            total += len(e) + 1
        if total >= n_tokens:
            return out
    raise SystemExit(f"corpus too small: {total} tokens < {n_tokens} needed")


def training_blocks(tok, docs: list[dict], n_blocks: int, block: int, seed: int) -> list[dict]:
    """n_blocks rows of `block` tokens packed as train.py packs them (spikelm.data.pack_token_lists): documents
    one after another with EOS between them, position_ids restarting at every document start."""
    from spikelm.data import pack_token_lists

    # pack_token_lists appends the EOS itself
    ids = [d[:-1] for d in document_ids(tok, docs, n_blocks * block + block, seed)]
    packed = pack_token_lists(ids, tok.eos_token_id, block)
    return [{"input_ids": torch.from_numpy(packed["input_ids"][i]), "position_ids": torch.from_numpy(packed["position_ids"][i])}
            for i in range(n_blocks)]


def long_documents(tok, docs: list[dict], length: int, max_docs: int) -> torch.Tensor:
    """The first length+1 tokens (EOS first, as a document start) of up to max_docs validation documents
    that are at least that long, in id order: [n, length + 1]."""
    rows = []
    for d in sorted(docs, key=lambda d: d["id"]):
        if len(d["text"]) < 3 * length:  # cheap pre-filter: BPE makes > 3 chars per token here
            continue
        e = [tok.eos_token_id] + tok(d["text"], add_special_tokens=False)["input_ids"]
        if len(e) >= length + 1:
            rows.append((d["id"], e[: length + 1]))
        if len(rows) >= max_docs:
            break
    return [r[0] for r in rows], torch.tensor([r[1] for r in rows], dtype=torch.long)


# ---------------------------------------------------------------------------------------- models
def spikelm_config(args, name: str, vocab: int):
    from spikelm.models import SpikeLMConfig

    # LIF with soft reset: with hard reset this model's gradient norm spikes to 1e5-1e6 within 50 steps
    # (clipping then discards those updates), which would make LIF a needlessly weak baseline
    return SpikeLMConfig(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         neuron_type=NEURON[name], num_attention_heads=args.heads, attention_window=args.block,
                         ssm_expand=2, mlp_ratio=args.mlp_ratio, tie_word_embeddings=True, lif_reset="soft",
                         firing_loss_coef=args.firing_loss_coef if name == "dsn_firing_loss" else 0.0,
                         firing_loss_target=args.firing_loss_target if name == "dsn_firing_loss" else 0.0)


def llama_config(args, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=args.llama_hidden, num_hidden_layers=args.llama_layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads,
                       intermediate_size=args.llama_intermediate, max_position_embeddings=16 * args.block,
                       tie_word_embeddings=True, attn_implementation="sdpa")


def build_model(args, name: str, vocab: int):
    torch.manual_seed(args.seed)
    if name == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(llama_config(args, vocab))
    from spikelm.models import SpikeLMForCausalLM

    return SpikeLMForCausalLM(spikelm_config(args, name, vocab))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embedding counted once


# -------------------------------------------------------------------------------------- training
def recipe_args(args, name: str):
    """train.py's arguments for this benchmark's run of one model (the recipe's defaults for everything else)."""
    from spikelm.training import TrainArgs

    return TrainArgs(output_dir=str(args.work / f"run_{name}"), overwrite_output_dir=True,
                     per_device_train_batch_size=args.batch, learning_rate=args.lr, weight_decay=args.weight_decay,
                     adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=args.clip, lr_scheduler_type="cosine",
                     warmup_steps=max(1, int(args.warmup * args.steps)), max_steps=args.steps, seed=args.seed,
                     save_steps=0, eval_steps=0, logging_steps=args.log_every, report_to="csv", disable_tqdm=True,
                     num_threads=args.threads or None)


def train(model, blocks: list[dict], args, name: str) -> dict:
    """Train with train.py's recipe and loop; every model gets the same blocks in the same order (BlockOrder)."""
    from spikelm.training import read_csv, train_model

    targs = recipe_args(args, name)
    t0 = time.time()
    summary = train_model(model, blocks, None, targs)
    rows = read_csv(Path(targs.output_dir) / "logs" / "train.csv")
    # the logged loss includes a firing loss where there is one: the curve keeps it as train.py logs it
    curve = [{"step": int(r["step"]), "loss": float(r["loss"]), "time_s": None} for r in rows]
    log(f"{name}: trained {summary['steps']} steps in {time.time() - t0:.0f}s")
    return {"train_time_s": time.time() - t0, "final_train_loss": curve[-1]["loss"] if curve else None,
            "curve": curve, "recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in
                                       dataclasses.asdict(targs).items() if k != "model"}}


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def eval_blocks(model, val_ids: torch.Tensor, args, spiking: bool) -> dict:
    """Mean token NLL over contiguous validation blocks of the training length, and firing rates."""
    from spikelm.eval import FiringRateMonitor

    model.eval()
    n = min(args.val_blocks, (val_ids.numel() - 1) // args.block)
    blocks = val_ids[: n * args.block].view(n, args.block)
    total, count = 0.0, 0
    monitor = FiringRateMonitor(model) if spiking else None
    if monitor:
        monitor.__enter__()
    try:
        for i in range(0, n, args.eval_batch):
            x = blocks[i:i + args.eval_batch]
            kw = {"use_cache": False}
            loss = model(input_ids=x, labels=x, **kw).loss
            k = x.shape[0] * (x.shape[1] - 1)
            total += float(loss) * k
            count += k
    finally:
        if monitor:
            monitor.__exit__(None, None, None)
    out = {"val_loss": total / count, "val_ppl": math.exp(total / count), "val_tokens": count}
    if monitor:
        s = monitor.summary()
        layers = s["layers"]
        out["firing"] = {"mean_rate": s["mean_rate"],
                         "mean_nonzero": sum(l["nonzero"] * l["elements"] for l in layers.values())
                         / max(1, sum(l["elements"] for l in layers.values())),
                         # binary events per neuron per step once integer spikes are unfolded (energy-relevant)
                         "events_per_neuron_step": sum(l["spikes"] for l in layers.values())
                         / max(1, sum(l["elements"] for l in layers.values())),
                         "layers": {k: {"rate": v["rate"], "nonzero": v["nonzero"], "channels": v["channels"]}
                                    for k, v in layers.items()}}
    return out


@torch.no_grad()
def eval_by_position(model, docs: torch.Tensor, args, name: str) -> dict:
    """NLL at every position 0..L-1 of each long document ([n, L + 1] tokens), averaged over documents."""
    model.eval()
    L = docs.shape[1] - 1
    nll = torch.zeros(L, dtype=torch.float64)
    for i in range(0, docs.shape[0], args.long_batch):
        d = docs[i:i + args.long_batch]
        if name == "llama":  # one forward, its own positions 0..L-1
            logits = model(input_ids=d[:, :L]).logits.float()
            nll += F.cross_entropy(logits.transpose(1, 2), d[:, 1:], reduction="none").double().sum(0)
        else:  # the streaming model: T tokens per call, state carried in the O(1) cache
            from spikelm.models import CACHE_NAME

            cache = None
            for a in range(0, L, args.block):
                b = min(L, a + args.block)
                out = model(input_ids=d[:, a:b], use_cache=True, **{CACHE_NAME: cache})
                cache = out[CACHE_NAME]
                nll[a:b] += F.cross_entropy(out.logits.float().transpose(1, 2), d[:, a + 1:b + 1],
                                            reduction="none").double().sum(0)
    nll /= docs.shape[0]
    T = args.block
    windows = [{"window": k + 1, "positions": [k * T, (k + 1) * T], "ppl": math.exp(float(nll[k * T:(k + 1) * T].mean()))}
               for k in range(L // T)]
    return {"length": L, "docs": int(docs.shape[0]), "nll_by_position": [round(float(v), 5) for v in nll],
            "ppl_by_window": windows,
            "ppl_1x": windows[0]["ppl"], "ppl_16x_last_window": windows[-1]["ppl"],
            "ppl_all": math.exp(float(nll.mean()))}


def energy_estimate(model, val_ids: torch.Tensor, args) -> dict | None:
    """Synaptic-operation energy per token (spikelm.eval.spiking_analysis: MAC 4.6 pJ, AC 0.9 pJ) on the first
    energy_blocks validation blocks, for the spiking network and the same graph run dense."""
    try:
        from spikelm.eval import spiking_analysis
    except ImportError:
        return None
    n = min(args.energy_blocks, (val_ids.numel() - 1) // args.block)
    x = val_ids[: n * args.block].view(n, args.block)
    a = spiking_analysis(model, x)
    nets = a["energy"]["networks"]
    return {"tokens": a["tokens"], "spiking_pj_per_token": nets["spiking"]["energy_pj_per_token"],
            "dense_pj_per_token": nets["dense"]["energy_pj_per_token"],
            "spiking_mac_per_token": nets["spiking"]["mac_per_token"], "spiking_ac_per_token": nets["spiking"]["ac_per_token"],
            "dense_over_spiking": a["energy"]["dense_over_spiking"],
            "spikes_per_token": a["firing"]["spikes_per_token"],
            "by_category_spiking": nets["spiking"]["by_category"], "mac_pj": a["energy"]["mac_pj"],
            "ac_pj": a["energy"]["ac_pj"]}


def add_energy(args) -> None:
    """Energy for models already trained: load each checkpoint, estimate, and add it to its JSON."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(args.work / f"tokenizer_{args.vocab}")
    val_ids = token_stream(tok, read_docs(args.corpus / "validation.jsonl"), args.val_blocks * args.block + 1,
                           args.seed + 1)
    for name in args.models:
        res, ckpt = args.results / f"{name}.json", args.work / f"{name}.pt"
        if name == "llama" or not res.exists() or not ckpt.exists():
            continue
        r = json.loads(res.read_text())
        from spikelm.models import SpikeLMConfig, SpikeLMForCausalLM

        model = SpikeLMForCausalLM(SpikeLMConfig(**{k: v for k, v in r["config"].items()
                                                    if k in SpikeLMConfig.__init__.__code__.co_varnames}))
        model.load_state_dict(torch.load(ckpt))
        r["energy"] = energy_estimate(model, val_ids, args)
        log(f"{name}: {r['energy']['spiking_pj_per_token']:.0f} pJ/token spiking, "
            f"{r['energy']['dense_pj_per_token']:.0f} dense")
        res.write_text(json.dumps(r) + "\n")


# ---------------------------------------------------------------------------------------- report
def machine_info(args) -> dict:
    from timing import cpu_info  # (benchmarks/ is sys.path[0] when the script runs)
    import transformers

    cpu = cpu_info()["model"]
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}


def summarize(args) -> dict:
    res_dir = args.results
    per = {}
    for name in MODELS:
        p = res_dir / f"{name}.json"
        if p.exists():
            per[name] = json.loads(p.read_text())
    if not per:
        raise SystemExit(f"no per-model results under {res_dir}")
    ref = per.get("llama", {}).get("val_ppl")
    lif = per.get("lif", {}).get("val_ppl")
    rows = []
    for name, r in per.items():
        pos = r.get("by_position", {})
        rows.append({"model": LABELS[name], "key": name, "params_M": r["params"] / 1e6, "val_ppl": r["val_ppl"],
                     "vs_llama": r["val_ppl"] / ref if ref else None, "vs_lif": r["val_ppl"] / lif if lif else None,
                     "ppl_1x": pos.get("ppl_1x"), "ppl_16x": pos.get("ppl_16x_last_window"),
                     "ratio_16x_1x": (pos["ppl_16x_last_window"] / pos["ppl_1x"]) if pos else None,
                     "firing_rate": r.get("firing", {}).get("mean_rate"),
                     "nonzero": r.get("firing", {}).get("mean_nonzero"),
                     "events": r.get("firing", {}).get("events_per_neuron_step"),
                     "train_min": r["train_time_s"] / 60, "energy": r.get("energy")})
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    energy_cell = lambda e: "-" if not e else f"{e['spiking_pj_per_token'] / 1e6:.2f} M ({e['dense_pj_per_token'] / 1e6:.2f} M)"  # noqa: E731
    first = next(iter(per.values()))
    cfg = first["settings"]
    lines = [f"Training: {cfg['steps']} steps x {cfg['batch']} x {cfg['block']} tokens = "
             f"{cfg['steps'] * cfg['batch'] * cfg['block'] / 1e6:.2f} M tokens per model (T = {cfg['block']}), "
             f"BPE vocab {cfg['vocab']}, seed {cfg['seed']}. Validation: {first['val_tokens']} tokens in T-blocks; "
             f"by position: {first.get('by_position', {}).get('docs')} documents of "
             f"{first.get('by_position', {}).get('length')} tokens (16 x T).", "",
             "| model | params | val ppl | / Llama | / LIF | ppl @ 1x (pos 0-T) | ppl @ 16x (last T) | 16x / 1x "
             "| firing rate | nonzero | events/neuron/step | energy pJ/token (dense) | train min |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_M']:.2f} M | {r['val_ppl']:.2f} | {fmt(r['vs_llama'], '.3f')} | "
                     f"{fmt(r['vs_lif'], '.3f')} | {fmt(r['ppl_1x'], '.2f')} | {fmt(r['ppl_16x'], '.2f')} | "
                     f"{fmt(r['ratio_16x_1x'], '.3f')} | {fmt(r['firing_rate'], '.4f')} | {fmt(r['nonzero'], '.4f')} | "
                     f"{fmt(r['events'], '.4f')} | {energy_cell(r['energy'])} | {r['train_min']:.1f} |")
    if "llama" in per:
        pos = per["llama"].get("by_position", {}).get("ppl_by_window", [])
        if pos:
            lines += ["", "Perplexity by position window (each window = T tokens; windows 2.. are past the training length):", "",
                      "| model | " + " | ".join(f"w{w['window']}" for w in pos) + " |",
                      "| --- |" + " ---: |" * len(pos)]
            for name, r in per.items():
                ws = r.get("by_position", {}).get("ppl_by_window", [])
                lines.append(f"| {LABELS[name]} | " + " | ".join(f"{w['ppl']:.1f}" for w in ws) + " |")
    targets = []
    for key in (k for k in DSN_MODELS if k in per):
        d, who = per[key], LABELS[key].replace("SpikeLM ", "")
        if ref:
            targets.append((f"{who}: val ppl <= 1.15 x Llama", d["val_ppl"] / ref, d["val_ppl"] / ref <= 1.15))
        if lif:
            targets.append((f"{who}: val ppl <= 0.9 x LIF", d["val_ppl"] / lif, d["val_ppl"] / lif <= 0.9))
        if "lif" in per and "firing" in d and "firing" in per["lif"]:
            a, b = d["firing"]["mean_rate"], per["lif"]["firing"]["mean_rate"]
            targets.append((f"{who}: fires less than LIF (rate = spikes / (N x neuron-steps), / LIF)", a / b, a < b))
            a, b = d["firing"]["events_per_neuron_step"], per["lif"]["firing"]["events_per_neuron_step"]
            targets.append((f"{who}: fires less than LIF (binary events after unfolding, / LIF)", a / b, a < b))
        if "lif" in per and d.get("energy") and per["lif"].get("energy"):
            a, b = d["energy"]["spiking_pj_per_token"], per["lif"]["energy"]["spiking_pj_per_token"]
            targets.append((f"{who}: energy per token < LIF's (not an issue target; / LIF)", a / b, a < b))
        if d.get("by_position"):
            q = d["by_position"]["ppl_16x_last_window"] / d["by_position"]["ppl_1x"]
            targets.append((f"{who}: ppl at 16x <= at 1x (last window / first)", q, q <= 1.0))
    if targets:
        lines += ["", "| target (issue 7) | measured | met |", "| --- | ---: | --- |"]
        lines += [f"| {t} | {v:.3f} | {'yes' if ok else 'NO'} |" for t, v, ok in targets]
    md = "\n".join(lines) + "\n"
    summary = {"machine": first.get("machine"), "settings": cfg, "rows": rows,
               "targets": [{"target": t, "value": v, "met": ok} for t, v, ok in targets],
               "command": first.get("command")}
    (res_dir / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    (res_dir / "quality.md").write_text(md)
    plots(per, res_dir, cfg["block"])
    print(md)
    return summary


def plots(per: dict, res_dir: Path, T: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no PNGs")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in per.items():
        ws = r.get("by_position", {}).get("ppl_by_window")
        if ws:
            ax.plot([w["positions"][1] for w in ws], [w["ppl"] for w in ws], marker="o", label=LABELS[name])
    ax.axvline(T, color="grey", ls="--", lw=1, label=f"training length T={T}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("position in document (end of each T-token window)")
    ax.set_ylabel("validation perplexity in window")
    ax.set_title("Perplexity by position up to 16 x the training length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(res_dir / "quality_ppl_by_position.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in per.items():
        c = r.get("curve")
        if c:
            loss = [p["loss"] for p in c]
            k = max(1, len(loss) // 50)
            sm = [sum(loss[max(0, i - k):i + 1]) / len(loss[max(0, i - k):i + 1]) for i in range(len(loss))]
            ax.plot([p["step"] for p in c], sm, label=LABELS[name])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (running mean)")
    ax.set_title("Training loss, same batches for every model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(res_dir / "quality_train_loss.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=HERE / ".corpus")
    p.add_argument("--work", type=Path, default=HERE / ".runs" / "quality", help="tokenizer, checkpoints (not in git)")
    p.add_argument("--results", type=Path, default=HERE / "results" / "quality")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tok-chars", type=int, default=20000, help="characters per train document for the BPE")
    p.add_argument("--block", type=int, default=128, help="training length T")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=320)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--mlp-ratio", type=int, default=4)
    p.add_argument("--llama-hidden", type=int, default=320)
    p.add_argument("--llama-layers", type=int, default=6)
    p.add_argument("--llama-intermediate", type=int, default=1048)
    p.add_argument("--val-blocks", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--long-docs", type=int, default=12)
    p.add_argument("--long-batch", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--firing-loss-coef", type=float, default=FIRING_LOSS_COEF,
                   help="SpikeLMConfig.firing_loss_coef of the dsn_firing_loss model")
    p.add_argument("--firing-loss-target", type=float, default=FIRING_LOSS_TARGET,
                   help="SpikeLMConfig.firing_loss_target of the dsn_firing_loss model")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--params-only", action="store_true", help="print parameter counts and exit")
    p.add_argument("--summarize", action="store_true", help="only rebuild the table and PNGs from per-model JSONs")
    p.add_argument("--energy-blocks", type=int, default=16, help="validation blocks for the energy estimate")
    p.add_argument("--energy", action="store_true", help="add energy estimates to finished models' JSONs, then summarize")
    p.add_argument("--prepare-only", action="store_true", help="train the tokenizer and tokenize, then exit")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.energy:
        add_energy(args)
    if args.summarize or args.energy:
        summarize(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])

    if args.params_only:
        counts = {m: n_params(build_model(args, m, args.vocab)) for m in args.models}
        for m, c in counts.items():
            print(f"{LABELS[m]:22s} {c / 1e6:8.3f} M params")
        lo, hi = min(counts.values()), max(counts.values())
        print(f"max/min = {hi / lo:.3f}")
        return

    train_docs = read_docs(args.corpus / "train.jsonl")
    val_docs = read_docs(args.corpus / "validation.jsonl")
    tok = get_tokenizer(args, train_docs)
    vocab = len(tok)
    t0 = time.time()
    train_blocks = training_blocks(tok, train_docs, args.steps * args.batch, args.block, args.seed)
    val_ids = token_stream(tok, val_docs, args.val_blocks * args.block + 1, args.seed + 1)
    long_ids, long_docs = long_documents(tok, val_docs, 16 * args.block, args.long_docs)
    log(f"data: {len(train_blocks) * args.block} train tokens, {val_ids.numel()} validation tokens, {long_docs.shape[0]} long "
        f"validation documents of {16 * args.block + 1} tokens ({time.time() - t0:.0f}s)")
    if args.prepare_only:
        return
    counts = {m: n_params(build_model(args, m, vocab)) for m in args.models}
    for m, c in counts.items():
        log(f"{LABELS[m]:22s} {c / 1e6:8.3f} M params")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["vocab"] = vocab

    for name in args.models:
        model = build_model(args, name, vocab)
        log(f"=== {LABELS[name]}: {counts[name] / 1e6:.3f} M params, {args.steps} steps")
        result = {"model": name, "label": LABELS[name], "params": counts[name], "settings": settings,
                  "config": model.config.to_dict(), "machine": machine_info(args), "command": command}
        result.update(train(model, train_blocks, args, name))
        torch.save(model.state_dict(), args.work / f"{name}.pt")
        t1 = time.time()
        result.update(eval_blocks(model, val_ids, args, spiking=name != "llama"))
        log(f"{name}: val ppl {result['val_ppl']:.2f}" + (f", firing rate {result['firing']['mean_rate']:.4f}"
                                                          if "firing" in result else ""))
        result["by_position"] = eval_by_position(model, long_docs, args, name)
        result["by_position"]["doc_ids"] = long_ids
        if name != "llama":
            result["energy"] = energy_estimate(model, val_ids, args)
        result["eval_time_s"] = time.time() - t1
        bp = result["by_position"]
        log(f"{name}: ppl by window " + " ".join(f"{w['ppl']:.1f}" for w in bp["ppl_by_window"]))
        (args.results / f"{name}.json").write_text(json.dumps(result) + "\n")
        del model
    summarize(args)


if __name__ == "__main__":
    main()
