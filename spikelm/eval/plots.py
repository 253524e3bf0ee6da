"""PNG charts for the evaluation results (matplotlib, headless)."""
from __future__ import annotations


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity_by_position(result: dict, path, title: str | None = None) -> None:
    """Perplexity per position bucket, one line per mode; the training length marked (x1, x2, ...)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"parallel": dict(marker="o", linestyle="-"), "streaming": dict(marker="x", linestyle="--")}
    for mode, entry in result["modes"].items():
        b = entry["buckets"]
        x = [(r["start"] + r["end"]) / 2 for r in b]
        ax.plot(x, [r["ppl"] for r in b], label=f"{mode} (overall ppl {entry['ppl']:.2f})", markersize=4,
                **styles.get(mode, {}))
    L = result.get("train_len")
    if L:
        ax.axvline(L, color="grey", linestyle=":", label=f"training length {L}")
        ax.set_xlabel(f"position (tokens of context; training length {L})")
    else:
        ax.set_xlabel("position (tokens of context)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "Perplexity by position")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spiking_analysis(result: dict, path, title: str | None = None) -> None:
    """Left: firing rate per neuron group. Right: energy per token by category, spiking vs non-spiking."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    groups = result["firing"]["groups"]
    names = sorted(groups)
    y = list(range(len(names)))
    ax1.barh([i - 0.2 for i in y], [groups[n]["rate"] for n in names], height=0.4, label="rate (mean spike / N)")
    ax1.barh([i + 0.2 for i in y], [groups[n]["nonzero"] for n in names], height=0.4, label="fraction non-zero")
    ax1.set_yticks(y, names)
    ax1.set_xlabel("firing")
    ax1.set_title(f"Firing by neuron group (mean rate {result['firing']['mean_rate']:.4f})")
    ax1.legend(fontsize=8)
    ax1.tick_params(axis="y", labelsize=7)
    nets = result["energy"]["networks"]
    cats = sorted(set(nets["spiking"]["by_category"]) | set(nets["dense"]["by_category"]))
    bottom = {net: 0.0 for net in nets}
    for cat in cats:
        vals = [nets[net]["by_category"].get(cat, {}).get("energy_pj_per_token", 0.0) / 1e6 for net in nets]
        ax2.bar(list(nets), vals, bottom=[bottom[n] for n in nets], label=cat)
        for n, v in zip(nets, vals):
            bottom[n] += v
    ratio = result["energy"].get("dense_over_spiking")
    ax2.set_ylabel("energy per token (uJ)")
    ax2.set_title(f"Energy per token (MAC {result['energy']['mac_pj']} pJ, AC {result['energy']['ac_pj']} pJ)"
                  + (f": non-spiking / spiking = {ratio:.2f}x" if ratio else ""), fontsize=9)
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
