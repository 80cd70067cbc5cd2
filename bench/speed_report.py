"""Tables and figure of bench/gpu_speed.py's JSON (no GPU needed: ``python bench/speed_report.py
RUN.json [RUN2.json ...] [--out DIR]`` writes gpu_speed.md and .png, merging the calls of a split).

Tables (Markdown, one per model; rows = caches, columns = shapes B, N):
1. decode ms/token, prefill seconds in brackets;
2. ratios, lower is better: ``S`` decode ms/token / compiled StaticCache's, ``Q`` / quanto's at the
   same bits (kvsink caches), ``P`` prefill / DynamicCache's (SDPA), ``M`` peak allocated memory /
   DynamicCache's -- all from the same run;
3. peak allocated GiB / cache GiB (``cache.nbytes()``);
4. the largest batch at N = --max-batch-ctx and its tokens/s (x the full-precision caches');
5. kernel level: decode-attention kernel time against its bytes-moved floor and the copy bandwidth.
Figure: decode ms/token and peak memory per cache and shape (grouped bars, log scale).
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["markdown", "write_figure", "merge", "shapes_of", "cell_of"]

GIB = 2 ** 30
BASELINE_STATIC, BASELINE_DYNAMIC = "static-compiled", "dynamic"


def shapes_of(result: dict, model: str) -> list:
    """The (batch, ctx) columns of ``model``, in the order they ran."""
    seen = []
    for c in result["cells"]:
        if c["model"] == model and (c["batch"], c["ctx"]) not in seen:
            seen.append((c["batch"], c["ctx"]))
    return seen


def cell_of(result, model, cache, batch, ctx):
    return next((c for c in result["cells"] if c["model"] == model and c["cache"] == cache
                 and c["batch"] == batch and c["ctx"] == ctx), None)


def _gib(nbytes) -> str:
    """GiB with 2 decimals, or MiB below 0.1 GiB (the CPU self-test's caches)."""
    return f"{nbytes / GIB:.2f}" if nbytes >= 0.1 * GIB else f"{nbytes / 2**20:.2f} MiB"


def _n(ctx: int) -> str:
    return f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx)


def _status(c) -> str:
    if c is None:
        return "–"
    return {"OOM": "OOM", "skipped": "skip", "error": "error"}.get(c["status"], c["status"])


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _quanto_name(cache: str, result: dict):
    bits = result["caches"].get(cache, {}).get("bits")
    fam = result["caches"].get(cache, {}).get("family")
    return f"quanto{bits}" if bits and fam in ("kvsink",) else None


def _model_tables(result, model) -> list:
    shapes = shapes_of(result, model)
    caches = list(result["caches"])
    head = ["cache"] + [f"B={b}, N={_n(n)}" for b, n in shapes]
    rows_t, rows_r, rows_m = [], [], []
    for cache in caches:
        t, r, m = [f"`{cache}`"], [f"`{cache}`"], [f"`{cache}`"]
        for b, n in shapes:
            c = cell_of(result, model, cache, b, n)
            if c is None or c["status"] != "ok":
                t.append(_status(c)), r.append(_status(c)), m.append(_status(c))
                continue
            t.append(f"{c['decode_ms_per_token']:.1f} ({c['prefill_s']:.2f})")
            parts = []
            for label, other, key in (("S", BASELINE_STATIC, "decode_ms_per_token"),
                                      ("Q", _quanto_name(cache, result), "decode_ms_per_token"),
                                      ("P", BASELINE_DYNAMIC, "prefill_s"),
                                      ("M", BASELINE_DYNAMIC, "peak_bytes")):
                o = cell_of(result, model, other, b, n) if other and other != cache else None
                x = _ratio(c.get(key), o.get(key)) if o is not None and o["status"] == "ok" else None
                if x is not None:
                    parts.append(f"{label} {x:.2f}")
            r.append(" · ".join(parts) or "–")
            peak = _gib(c["peak_bytes"]) if c.get("peak_bytes") else "–"
            m.append(f"{peak} / {_gib(c['cache_nbytes'])}")
        rows_t.append(t), rows_r.append(r), rows_m.append(m)
    env = result["environment"]
    return [f"### {model} ({env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
            f"triton {env.get('triton')})",
            "Decode ms/token (prefill s):", _table(head, rows_t),
            "Ratios (lower is better; S: decode / compiled StaticCache, Q: decode / quanto at the same "
            "bits, P: prefill / DynamicCache, M: peak memory / DynamicCache):", _table(head, rows_r),
            "Peak allocated GiB / cache GiB:", _table(head, rows_m)]


def _max_batch_table(result) -> list:
    recs = result.get("max_batch") or []
    if not recs:
        return []
    rows = []
    for rec in recs:
        full = [o for o in recs if o["model"] == rec["model"] and o["cache"] in (BASELINE_DYNAMIC, BASELINE_STATIC)
                and o["status"] == "ok"]
        if rec["status"] == "ok":
            ratio = " · ".join(f"{o['cache']} ×{rec['tokens_per_s'] / o['tokens_per_s']:.2f}" for o in full)
            rows.append([rec["model"], f"`{rec['cache']}`", str(rec.get("estimate", "–")), str(rec["batch"]),
                         f"{rec['tokens_per_s']:.0f}", ratio or "–"])
        else:
            rows.append([rec["model"], f"`{rec['cache']}`", str(rec.get("estimate", "–")), rec["status"],
                         "–", "–"])
    ctx = _n(recs[0]["ctx"])
    return [f"Largest batch at N={ctx} (estimated from the measured bytes per sequence, then run):",
            _table(["model", "cache", "estimate", "batch run", "tokens/s", "tokens/s ratio"], rows)]


def _kernel_table(result) -> list:
    k = result.get("kernels")
    if not k:
        return []
    if "copy_Bps" not in k:
        return [f"Kernel level: not measured ({k.get('error', 'no result')})."]
    rows = []
    for c in k["cases"]:
        if "api_us" not in c:
            rows.append([c["model"], str(c["batch"]), _n(c["ctx"]), str(c["bits"]), c.get("status", "?"),
                         "–", "–", "–", "–"])
            continue
        graph = f"{c['graph_us']:.1f}" if "graph_us" in c else "–"
        rows.append([c["model"], str(c["batch"]), _n(c["ctx"]), str(c["bits"]), f"{c['bytes'] / 1e6:.1f}",
                     f"{c['floor_us']:.1f}", f"{c['api_us']:.1f}", graph,
                     f"{c['achieved_Bps'] / 1e12:.2f} ({100 * c['fraction_of_copy']:.0f} %)"])
    return [f"Decode-attention kernel (copy bandwidth {k['copy_Bps'] / 1e12:.2f} TB/s, read + write):",
            _table(["model", "B", "N", "bits", "MB read", "floor µs", "call µs", "CUDA graph µs",
                    "achieved TB/s (of copy)"], rows)]


def markdown(result: dict) -> str:
    parts = []
    for model in result["models"]:
        parts += _model_tables(result, model)
    parts += _max_batch_table(result) + _kernel_table(result)
    notes = [f"- {c['model']} B={c['batch']} N={_n(c['ctx'])} `{c['cache']}`: {c['status']}: "
             f"{c.get('reason') or c.get('error', '')}" for c in result["cells"]
             if c["status"] != "ok" and (c.get("reason") or c.get("error"))]
    if notes:
        parts += ["Cells not measured:", "\n".join(notes)]
    if not result.get("complete"):
        parts.append("(Run incomplete: the process stopped before the end; the cells above are those it finished.)")
    return "\n\n".join(parts) + "\n"


def write_figure(result: dict, path: str) -> None:
    """Decode ms/token and peak memory per cache and shape (grouped bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = [(m, b, n) for m in result["models"] for b, n in shapes_of(result, m)]
    caches = list(result["caches"])
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.4 * len(columns) + 2), 7.5), sharex=True)
    width = 0.8 / max(1, len(caches))

    def series(cache, key, scale):
        xs, ys = [], []
        for j, (m, b, n) in enumerate(columns):
            c = cell_of(result, m, cache, b, n)
            if c is not None and c["status"] == "ok" and c.get(key):
                xs.append(j + (caches.index(cache) - (len(caches) - 1) / 2) * width)
                ys.append(c[key] / scale)
        return xs, ys
    for i, cache in enumerate(caches):
        for j, (m, b, n) in enumerate(columns):                # say why a bar is missing
            c = cell_of(result, m, cache, b, n)
            if c is not None and c["status"] != "ok":
                x = j + (i - (len(caches) - 1) / 2) * width
                for ax in axes:
                    ax.text(x, 0.02, _status(c), rotation=90, fontsize=6, ha="center", va="bottom",
                            transform=ax.get_xaxis_transform())
        color = f"C{i}"
        axes[0].bar(*series(cache, "decode_ms_per_token", 1), width, label=cache, color=color)
        axes[1].bar(*series(cache, "peak_bytes", GIB), width, color=color)
        axes[1].plot(*series(cache, "cache_nbytes", GIB), "o", color="black", markersize=3,
                     label="cache.nbytes()" if i == 0 else None)
    axes[0].set_ylabel("decode ms / token")
    axes[1].set_ylabel("GiB: peak allocated (bars), cache (dots)")
    for ax in axes:
        if ax.has_data():
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no cell measured", ha="center", va="center", transform=ax.transAxes)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8)
    axes[1].set_xticks(range(len(columns)))
    axes[1].set_xticklabels([f"{m}\nB={b} N={_n(n)}" for m, b, n in columns], fontsize=8)
    axes[0].legend(fontsize=8, ncol=min(4, len(caches)))
    axes[0].set_title(f"{result['environment']['device']}: decode speed and memory per KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(results: list) -> dict:
    """Several runs (the device calls of one split) as one result: their cells, largest batches
    and kernel cases side by side.  Ratios stay within a shape, which one call measures whole."""
    first = results[0]
    out = {"environment": first["environment"], "runs": [r["environment"] for r in results],
           "models": {}, "caches": {}, "cells": [], "max_batch": [], "kernels": None,
           "complete": all(r.get("complete") for r in results)}
    for r in results:
        out["models"].update(r["models"])
        out["caches"].update(r["caches"])
        out["cells"] += r["cells"]
        out["max_batch"] += r.get("max_batch") or []
        if r.get("kernels") and "copy_Bps" in r["kernels"]:
            out["kernels"] = out["kernels"] or {"copy_Bps": r["kernels"]["copy_Bps"], "cases": []}
            out["kernels"]["cases"] += r["kernels"]["cases"]
    return out


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description="gpu_speed.py's tables and figure from its JSON file(s)")
    ap.add_argument("json", nargs="+", help="gpu_speed.json of one run, or of several calls to merge")
    ap.add_argument("--out", default=None, help="directory for gpu_speed.md/.png (default: the first file's)")
    args = ap.parse_args(argv)
    runs = []
    for path in args.json:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            ap.error(f"{path}: {e}")
    res = merge(runs) if len(runs) > 1 else runs[0]
    out = args.out or os.path.dirname(os.path.abspath(args.json[0]))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_speed.md"), "w") as f:
        f.write(markdown(res))
    write_figure(res, os.path.join(out, "gpu_speed.png"))
    print(markdown(res))


if __name__ == "__main__":
    main()
