"""The perplexity report of ``kvsink eval``: paired differences, KV bytes, table, files, figure.

docs/12-evaluation.md §12.5.  A report is a list of :class:`Row` (one per
method and bit width, the first is full precision), each holding one
``PerplexityResult`` per protocol and the label of the row it is compared with.

* :func:`paired_difference` — the difference of two results' perplexities and
  its standard error over windows, from the per-window NLLs (the windows are
  the same text, so the difference is paired);
* :func:`kv_bytes_per_token` — bytes a row's KV cache holds per token, exact
  (docs/06-cache.md definition 6.17, the reference cache's ``nbytes()``), and
  :func:`full_precision_bytes_per_token`;
* :func:`render_table`, :func:`to_markdown`, :func:`to_json`, :func:`plot` —
  the outputs; :func:`check_output_path` checks an output path before a run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "NOISE_SE",
    "Row",
    "paired_difference",
    "within_noise",
    "kv_bytes_per_token",
    "full_precision_bytes_per_token",
    "row_cells",
    "noise_lines",
    "render_table",
    "to_markdown",
    "to_json",
    "plot",
    "check_output_path",
    "check_plot_available",
    "OutputPathError",
]

#: A difference is "within noise" when ``|diff| < NOISE_SE * standard error`` (about a 95 %
#: interval that contains 0, for a mean over enough windows).
NOISE_SE = 2.0


class OutputPathError(ValueError):
    """An output file (``--json``, ``--markdown``, ``--plot``) cannot be written."""


@dataclass
class Row:
    """One line of the report: ``label`` at ``bits``; ``results`` maps a protocol to its
    ``PerplexityResult``; ``compare_to`` is the label of the row (same bits, or full precision)
    the paired difference is taken against (None for full precision); ``nbytes`` maps a protocol
    to the KV bytes per token (None where not computed)."""

    label: str
    bits: str
    results: dict
    compare_to: Optional[str] = None
    nbytes: Dict[str, Optional[float]] = field(default_factory=dict)


# =========================================================================== statistics

def paired_difference(result, reference) -> Tuple[float, float]:
    """``(ppl(result) - ppl(reference), standard error)`` over the same windows.

    Per window ``w`` the mean NLL per scored token differs by
    ``d_w = (window_nll_w - reference.window_nll_w) / (seq_len - 1)``; over ``W`` windows
    ``se(d) = stdev(d) / sqrt(W)`` (sample standard deviation).  The perplexities are
    ``exp(mean NLL)``, so ``ppl - ppl_ref = ppl_ref (exp(mean d) - 1)`` and, to first order
    (delta method), its standard error is ``ppl * se(d)``.  With one window the error is
    ``nan`` (no spread to estimate).  ``ValueError`` if the results are not over the same windows.
    """
    a, b = list(result.window_nll), list(reference.window_nll)
    if len(a) != len(b) or not a or result.seq_len != reference.seq_len:
        raise ValueError(f"paired difference needs results over the same windows: {len(a)} and "
                         f"{len(b)} windows of {result.seq_len} and {reference.seq_len} tokens")
    scored = result.seq_len - 1
    d = [(x - y) / scored for x, y in zip(a, b)]
    w = len(d)
    if w < 2:
        return result.ppl - reference.ppl, float("nan")
    mean = math.fsum(d) / w
    var = math.fsum((x - mean) ** 2 for x in d) / (w - 1)
    return result.ppl - reference.ppl, result.ppl * math.sqrt(var / w)


def within_noise(diff: float, se: float) -> Optional[bool]:
    """``|diff| < NOISE_SE * se`` (a difference of exactly 0 included); None when the error is
    unknown (one window)."""
    if not math.isfinite(se):
        return None
    return diff == 0 or abs(diff) < NOISE_SE * se


# =========================================================================== bytes

def _kv_shape(model_config) -> Tuple[int, int, int, int]:
    """``(quantized layers, full-precision sliding layers, KV heads, head dim)`` of a model config."""
    cfg = model_config.get_text_config(decoder=True)
    n = int(cfg.num_hidden_layers)
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
    full = sum(t == "full_attention" for t in types)
    h = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return full, n - full, h, d


def full_precision_bytes_per_token(model_config, itemsize: int) -> float:
    """``2 * layers * KV heads * head_dim * itemsize``: a ``DynamicCache``'s keys and values."""
    full, sliding, h, d = _kv_shape(model_config)
    return float(2 * (full + sliding) * h * d * itemsize)


def _layer_nbytes(config, h: int, d: int, seq_len: int, preserved: int, itemsize: int) -> int:
    """``nbytes()`` of one reference cache layer holding ``seq_len`` tokens of which the first
    ``preserved`` are preserved, every other token quantized (residual length 0): definition 6.17."""
    import numpy as np
    from reference.cache import QuantizedKVCacheLayer
    dtype = np.float16 if itemsize == 2 else np.float32
    layer = QuantizedKVCacheLayer(config.replace(residual_length=0, preserve="none"), dtype=dtype)
    x = np.zeros((1, h, seq_len, d), dtype=dtype)
    layer.update(x, x)
    flags = np.zeros((1, seq_len), dtype=bool)
    flags[0, :preserved] = True
    layer.resolve(flags)
    layer.flush()
    return int(layer.nbytes())


def kv_bytes_per_token(config, model_config, seq_len: int, preserved_counts: Sequence[int],
                       itemsize: int) -> Optional[float]:
    """Exact KV bytes per token of the fake-quant protocol's windows, averaged over windows.

    Each window's ``seq_len`` tokens are held as the streaming cache holds them once flushed
    with no residual window: every token quantized in blocks (codes, scales, zero points, one
    flag byte), the window's preserved tokens also in the preserved store at full precision
    (docs/06-cache.md definition 6.17; computed by ``reference.cache.QuantizedKVCacheLayer.nbytes``);
    times the quantized layers, plus full precision for sliding-window layers.  Tokens after the
    last whole block (``seq_len mod token_block``) stay full precision.  ``quantizer="kvquant"``:
    None (its sparse outliers depend on the data; the streaming protocol reports measured bytes).
    """
    if config.quantizer != "uniform":
        return None
    full, sliding, h, d = _kv_shape(model_config)
    cache: Dict[int, int] = {}
    total = 0
    for p in preserved_counts:
        if p not in cache:
            cache[p] = _layer_nbytes(config, h, d, seq_len, p, itemsize)
        total += cache[p]
    per_layer = total / (len(preserved_counts) * seq_len)
    return full * per_layer + sliding * 2 * h * d * itemsize


# =========================================================================== cells

def _fmt(x: float) -> str:
    return "nan" if x != x else (f"{x:.3f}" if abs(x) < 1e4 else f"{x:.4g}")


def row_cells(row: Row, rows: Sequence[Row], protocol: str, fp_bytes: float) -> List[str]:
    """``[method, bits, ppl, diff ± se vs ref, kept/window, KV bytes/token, ratio]`` for one row."""
    r = row.results[protocol]
    ref = _find(rows, row.compare_to, row.bits)
    if ref is None:
        diff = "-"
    else:
        dv, se = paired_difference(r, ref.results[protocol])
        diff = f"{dv:+.3f} ± {_fmt(se)} vs {ref.label}"
    kept = "-" if r.protocol == "fp" else f"{r.preserved_count / max(r.windows, 1):.1f}"
    b = fp_bytes if r.protocol == "fp" else row.nbytes.get(protocol)
    nbytes = "-" if b is None else f"{b:,.0f}"
    ratio = "-" if b is None else f"{fp_bytes / b:.2f}x"
    return [row.label, row.bits, _fmt(r.ppl), diff, kept, nbytes, ratio]


HEADER = ["method", "bits", "perplexity", "difference (± SE) to", "kept/window", "KV bytes/token",
          "smaller by"]


def _find(rows: Sequence[Row], label: Optional[str], bits: str) -> Optional[Row]:
    if label is None:
        return None
    for r in rows:
        if r.label == label and (r.bits == bits or r is rows[0]):
            return r
    raise ValueError(f"row {label!r} at {bits} bits is not in the report")


def noise_lines(rows: Sequence[Row], protocol: str) -> List[str]:
    """The rule and which differences are within noise / beyond it."""
    inside, beyond, unknown = [], [], []
    for row in rows[1:]:
        ref = _find(rows, row.compare_to, row.bits)
        if ref is None:
            continue
        dv, se = paired_difference(row.results[protocol], ref.results[protocol])
        what = f"{row.label} vs {ref.label} at {row.bits} bit"
        verdict = within_noise(dv, se)
        (unknown if verdict is None else inside if verdict else beyond).append(what)
    rule = (f"difference: paired over windows, ± its standard error; within noise when "
            f"|difference| < {NOISE_SE:g} SE")
    out = [rule]
    if inside:
        out.append("within noise: " + "; ".join(inside))
    if beyond:
        out.append("beyond noise: " + "; ".join(beyond))
    if unknown:
        out.append("no standard error with one window (use --windows 2 or more): " + "; ".join(unknown))
    return out


# =========================================================================== outputs

def render_table(title: str, rows: Sequence[Row], protocol: str, fp_bytes: float, caption: str,
                 file) -> None:
    """Print the table (rich when installed, plain text otherwise) and the caption to ``file``."""
    cells = [row_cells(r, rows, protocol, fp_bytes) for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        table = Table(title=title)
        for i, h in enumerate(HEADER):
            table.add_column(h, justify="left" if i in (0, 1, 3) else "right")
        for c in cells:
            table.add_row(*c)
        console = Console(file=file, width=120)
        console.print(table)
        console.print(caption, highlight=False, soft_wrap=True)
        return
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADER)]
    print(title, file=file)
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for c in cells:
        print("  ".join(x.ljust(w) if i in (0, 1, 3) else x.rjust(w)
                        for i, (x, w) in enumerate(zip(c, widths))), file=file)
    print(caption, file=file)


def to_markdown(title: str, rows: Sequence[Row], protocols: Sequence[str], fp_bytes: float,
                captions: Dict[str, str]) -> str:
    """The tables as GitHub markdown (one per protocol), each followed by its caption."""
    out = []
    for proto in protocols:
        out.append(f"**{title}** ({proto} protocol)\n")
        out.append("| " + " | ".join(HEADER) + " |")
        out.append("|" + "|".join("---" for _ in HEADER) + "|")
        for r in rows:
            out.append("| " + " | ".join(row_cells(r, rows, proto, fp_bytes)) + " |")
        out.append("")
        out.extend(line + "  " for line in captions[proto].splitlines())
        out.append("")
    return "\n".join(out)


def to_json(rows: Sequence[Row], protocols: Sequence[str], fp_bytes: float) -> List[dict]:
    """One dict per row: method, bits, compared_to and per protocol the perplexity, the paired
    difference and its standard error, bytes per token, compression ratio and the full result."""
    out = []
    for row in rows:
        entry = {"method": row.label, "bits": row.bits, "compared_to": row.compare_to}
        ref = _find(rows, row.compare_to, row.bits)
        for proto in protocols:
            r = row.results[proto]
            d = r.to_dict()
            if ref is not None:
                d["difference"], d["difference_se"] = paired_difference(r, ref.results[proto])
                d["within_noise"] = within_noise(d["difference"], d["difference_se"])
            b = fp_bytes if r.protocol == "fp" else row.nbytes.get(proto)
            d["kv_bytes_per_token"] = b
            d["compression_ratio"] = None if b is None else fp_bytes / b
            entry[proto] = d
        out.append(entry)
    return out


def check_plot_available() -> None:
    """``ImportError`` with the install command when matplotlib (the ``plot`` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'kvsink[plot]' "
                          "(or pip install matplotlib)") from None


def plot(path, rows: Sequence[Row], protocol: str, title: str) -> None:
    """Perplexity against bits, one line per method; error bars: the standard error of the
    paired difference to full precision; full precision as a horizontal line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fp = rows[0].results[protocol]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.axhline(fp.ppl, color="black", lw=1, ls="--", label=f"{rows[0].label} ({fp.ppl:.2f})")
    labels = list(dict.fromkeys(r.label for r in rows[1:]))
    for i, label in enumerate(labels):
        mine = sorted((r for r in rows[1:] if r.label == label), key=lambda r: int(r.bits))
        xs = [int(r.bits) + 0.06 * (i - (len(labels) - 1) / 2) for r in mine]
        ys = [r.results[protocol].ppl for r in mine]
        es = [paired_difference(r.results[protocol], fp)[1] for r in mine]
        es = [0.0 if not math.isfinite(e) else e for e in es]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    bits = sorted({int(r.bits) for r in rows[1:]})
    ax.set_xticks(bits)
    ax.set_xlabel("key/value bits")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, "error bars: ± 1 SE of the paired difference to full precision",
             fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def check_output_path(path, option: str) -> Path:
    """``OutputPathError`` (naming ``option``) unless ``path`` can be written: its folder exists and
    is writable, and it is not a folder itself.  Nothing is created."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder; give a file name, e.g. {p / 'results'}")
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path}: folder {parent} does not exist; create it or choose "
                              "another path")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputPathError(f"{option} {path}: not writable; choose a path you can write to")
    return p
