"""The figures of ``accelerated.analyze`` (docs/14-sinks.md), drawn with matplotlib (the ``plot`` extra).

Each function draws one PNG from the analysis summary and arrays and returns
its file name; :func:`draw_all` draws the four.  Layers are counted as in
docs/04: hidden state ``l`` is the output of decoder layer ``l - 1``
(``l = 0``: the embeddings); attention figures count decoder layers from 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

__all__ = ["require_matplotlib", "draw_all", "draw_channels", "draw_attention",
           "draw_predictor", "draw_quantization"]

_DPI = 80


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or ``ImportError`` naming the ``plot`` extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("kvsink analyze draws its figures with matplotlib, which is not "
                          "installed: pip install 'kvsink[plot]' (or pip install matplotlib)") from None
    return plt


def _save(fig, out: Path, name: str) -> str:
    from matplotlib.ticker import MaxNLocator
    for ax in fig.axes:
        if ax.get_label() != "<colorbar>":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / name, dpi=_DPI)
    require_matplotlib().close(fig)
    return name


def draw_channels(summary: dict, hidden, sinks: np.ndarray, out: Path) -> str:
    """(a) Peak |h| per layer on sink / other tokens and the median; heat maps of the top channels."""
    plt = require_matplotlib()
    rows = summary["channels"]
    layers = np.arange(len(rows))
    chans = []
    for r in rows:
        for c, _, _ in (r["top_sink"] or r["top_other"])[:2]:
            if c not in chans:
                chans.append(c)
    chans = chans[:10]
    a = np.stack([np.abs(h[:, chans]) for h in hidden])            # (L+1, T, k)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for key, label, style in (("peak_sink", "sink tokens (oracle)", "r-o"),
                              ("peak_other", "other tokens", "b-s")):
        vals = [np.nan if r[key] is None else r[key] for r in rows]
        ax.semilogy(layers, vals, style, ms=3, label=f"max |h| over {label}")
    ax.semilogy(layers, [r["median"] for r in rows], "k--", label="median |h| of the layer")
    p = summary["predictor"]
    if p:
        ax.axvline(p["layer"], color="g", ls=":", label=f"prediction layer {p['layer']}")
    ax.set(xlabel="hidden state l (0 = embeddings, l = output of decoder layer l-1)",
           ylabel="|h| (log)", title="Massive activations across layers")
    ax.legend(fontsize=7)
    vmax = max(float(a.max()), 1e-6)
    for ax, mask, what in ((axes[1], sinks, "sink tokens"), (axes[2], ~sinks, "other tokens")):
        img = a[:, mask].max(axis=1) if mask.any() else np.zeros((a.shape[0], len(chans)))
        im = ax.imshow(np.log10(np.maximum(img.T, 1e-3)), aspect="auto", cmap="magma",
                       vmin=-1, vmax=np.log10(vmax), origin="lower")
        ax.set(yticks=range(len(chans)), yticklabels=[str(c) for c in chans],
               xlabel="hidden state l", ylabel="channel",
               title=f"max |h[t, c]| over {what} (log10)")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{summary['model']}: top hidden-state channels, {summary['tokens']} tokens")
    return _save(fig, out, "channels.png")


def draw_attention(summary: dict, received: np.ndarray, sinks: np.ndarray,
                   predicted: Optional[np.ndarray], out: Path) -> str:
    """(b) Attention received per token (multiples of uniform), pooled and per layer; sinks marked."""
    plt = require_matplotlib()
    pooled = received.mean(axis=0)
    t = np.arange(pooled.shape[0])
    fig, axes = plt.subplots(2, 1, figsize=(12, 7), gridspec_kw={"height_ratios": [1, 1.3]})
    ax = axes[0]
    ax.semilogy(t, np.maximum(pooled, 1e-4), "-", color="0.4", lw=0.8,
                label="attention received, mean over layers, heads, queries")
    ax.axhline(summary["oracle_ratio"], color="k", ls="--", lw=0.8,
               label=f"oracle ratio {summary['oracle_ratio']:g}")
    ax.semilogy(t[sinks], np.maximum(pooled[sinks], 1e-4), "ro", ms=6, mfc="none",
                label=f"oracle sinks ({int(sinks.sum())})")
    if predicted is not None:
        ax.semilogy(t[predicted], np.maximum(pooled[predicted], 1e-4), "gx", ms=7,
                    label=f"predicted sinks ({int(predicted.sum())})")
    ax.set(xlabel="token position", ylabel="x uniform attention (log)",
           title="Attention received per token")
    ax.legend(fontsize=7, loc="upper right")
    im = axes[1].imshow(np.log10(np.maximum(received, 1e-2)), aspect="auto", cmap="viridis",
                        origin="lower", interpolation="nearest")
    axes[1].set(xlabel="token position", ylabel="decoder layer",
                title="Attention received per layer (log10 multiples of uniform)")
    fig.colorbar(im, ax=axes[1], orientation="horizontal", pad=0.2, fraction=0.05)
    fig.suptitle(summary["model"])
    return _save(fig, out, "attention.png")


def draw_predictor(summary: dict, out: Path) -> str:
    """(c) Precision and recall of the predicted sinks against each decoder layer's oracle."""
    plt = require_matplotlib()
    rows = [r for r in summary["predictor_vs_oracle"] if r["layer"] != "all"]
    layers = [r["layer"] for r in rows]
    nan = lambda v: np.nan if v is None else v                     # noqa: E731
    fig, ax = plt.subplots(figsize=(9, 4))
    p = summary["predictor"]
    if p:
        ax.plot(layers, [nan(r["precision"]) for r in rows], "b-o", ms=4, label="precision (KVSink)")
        ax.plot(layers, [nan(r["recall"]) for r in rows], "r-s", ms=4, label="recall (KVSink)")
        ax.axvline(p["layer"] - 0.5, color="g", ls=":",
                   label=f"predictor reads h_{p['layer']} (channels {p['channels'][:4]})")
        title = f"Predicted sinks ({len(p['predicted'])}) vs. the attention oracle per layer"
    else:
        title = "No predictor (calibration found no stable outlier)"
    ax.plot(layers, [nan(r["pfn1_recall"]) for r in rows], "k--", lw=1, label="recall (PFN-1)")
    ax2 = ax.twinx()
    ax2.bar(layers, [r["oracle"] for r in rows], color="0.85", zorder=0, label="oracle sinks")
    ax2.set_ylabel("oracle sinks in the layer")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set(xlabel="decoder layer", ylabel="precision / recall", ylim=(-0.03, 1.03), title=title)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    return _save(fig, out, "predictor.png")


def draw_quantization(summary: dict, out: Path) -> str:
    """(d) Relative attention-output error per layer when one token's K/V is quantized."""
    plt = require_matplotlib()
    q = summary["quantization"]
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = ["r", "m", "orange", "brown"]
    for i, b in enumerate(q["bits"]):
        for key, style, who in (("sink", "-o", f"sink tokens {q['sink_tokens']}"),
                                ("control", "--s", f"{len(q['control_tokens'])} ordinary tokens")):
            vals = q[key][str(b)]
            if vals and vals[0] is not None:
                ax.semilogy(range(len(vals)), np.maximum(vals, 1e-9), style, color=colors[i % 4],
                            ms=3, label=f"{b}-bit, {who}")
    ax.set(xlabel="decoder layer", ylabel="||O' - O|| / ||O|| (log)",
           title=f"Quantizing one token's K and V (per token, groups of {q['group_size']}): "
                 "attention-output error")
    ax.legend(fontsize=7)
    return _save(fig, out, "quantization.png")


def draw_all(summary: dict, hidden, received, sinks, predicted, out: Path) -> Dict[str, str]:
    """Draw the four figures into ``out``; returns ``{figure: file name}``."""
    return {"channels": draw_channels(summary, hidden, sinks, out),
            "attention": draw_attention(summary, received, sinks, predicted, out),
            "predictor": draw_predictor(summary, out),
            "quantization": draw_quantization(summary, out)}
