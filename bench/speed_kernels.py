"""Kernel-level numbers for bench/gpu_speed.py (CUDA only).

* copy bandwidth: a 1 GiB device-to-device copy, ``triton.testing.do_bench`` median, counting bytes
  read + written (METHOD: the memory ceiling, measured on the machine);
* the decode-attention kernel on the quantized segment (one decode query per sequence, KIVI
  layout: keys per channel, values per token, groups of 32, asymmetric): the public call
  ``accelerated.attention.quantized_segment_attention`` timed by ``do_bench`` (median, L2 flushed),
  and the kernel's launcher ``accelerated.attention_kernels.quantized_partial_attention`` captured
  in a CUDA graph and replayed (GPU time without host overhead; skipped, with the reason, if that
  launcher is gone or cannot be captured).  Its floor is ``bench.bench_kernels.attn_bytes`` (every packed word, statistic
  and position read once; the formula of accelerated/attention_kernels.py's header), and the
  achieved bandwidth is those bytes over the measured time, reported as a fraction of the copy
  bandwidth (issue 9's target: >= 70 %).
"""

from __future__ import annotations

import math

import torch

__all__ = ["copy_bandwidth", "graph_ms", "decode_kernel_case", "kernel_level"]

KSPEC = ("channel", "token")       # key axis, value axis (groups of 32, asymmetric)


def copy_bandwidth(nbytes: int = 2 ** 30) -> float:
    """Bytes per second of a device-to-device copy, read + written counted."""
    import triton.testing as tt
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a), return_mode="median")
    del a, b
    return 2 * nbytes / (ms * 1e-3)


def graph_ms(fn) -> float:
    """Median milliseconds of ``fn`` captured once in a CUDA graph and replayed (GPU time only)."""
    import triton.testing as tt
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    return tt.do_bench(graph.replay, return_mode="median")


def decode_kernel_case(batch: int, kv_heads: int, q_heads: int, ctx: int, head_dim: int, bits: int,
                       copy_bw: float) -> dict:
    """Time one decode-attention call over a ``ctx``-token quantized segment; see the module doc."""
    import triton.testing as tt
    from accelerated import attention as AA
    from accelerated import quantize as AQ
    from bench.bench_kernels import attn_bytes
    g = torch.Generator(device="cuda").manual_seed(ctx + batch)
    shape = (batch, kv_heads, ctx, head_dim)
    k = torch.randn(shape, device="cuda", generator=g)
    v = torch.randn(shape, device="cuda", generator=g)
    pk = AQ.quantize_packed(k, bits, 32, KSPEC[0])
    pv = AQ.quantize_packed(v, bits, 32, KSPEC[1])
    del k, v
    q = torch.randn((batch, q_heads, 1, head_dim), device="cuda", generator=g)
    kpos = torch.arange(ctx, device="cuda").repeat(batch, 1)
    qpos = torch.full((batch, 1), ctx, device="cuda")

    def call():
        return AA.quantized_segment_attention(q, pk, pv, query_positions=qpos, key_positions=kpos,
                                              scale=1 / math.sqrt(head_dim), check_query=False)

    def kernel():
        from accelerated import attention_kernels as AK
        return AK.quantized_partial_attention(q, pk, pv, qpos, kpos, 1 / math.sqrt(head_dim))
    nbytes = attn_bytes(batch, kv_heads, ctx, head_dim, (bits, 32, KSPEC[0], False),
                        (bits, 32, KSPEC[1], False), q_heads, 1)
    row = {"batch": batch, "kv_heads": kv_heads, "q_heads": q_heads, "ctx": ctx, "head_dim": head_dim,
           "bits": bits, "bytes": nbytes, "floor_us": nbytes / copy_bw * 1e6}
    row["api_us"] = tt.do_bench(call, return_mode="median") * 1e3
    try:
        row["graph_us"] = graph_ms(kernel) * 1e3
    except Exception as e:  # noqa: BLE001 - a call that synchronises cannot be captured: say so
        row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    best = min(row.get("graph_us", math.inf), row["api_us"])
    row["achieved_Bps"] = nbytes / (best * 1e-6)
    row["fraction_of_copy"] = row["achieved_Bps"] / copy_bw
    return row


def kernel_level(shapes, ctxs, batches, bits_list) -> dict:
    """Copy bandwidth, then :func:`decode_kernel_case` for every (model shape, B, N, bits)."""
    out = {"copy_Bps": copy_bandwidth(), "cases": []}
    for shape in shapes:
        for ctx in ctxs:
            for batch in batches:
                for bits in bits_list:
                    try:
                        row = decode_kernel_case(batch, shape.kv_heads, shape.heads, ctx, shape.head_dim,
                                                 bits, out["copy_Bps"])
                    except torch.OutOfMemoryError:
                        row = {"status": "OOM"}
                    except Exception as e:  # noqa: BLE001 - one failing case must not lose the rest
                        row = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    row.update(model=shape.name, batch=batch, ctx=ctx, bits=bits)
                    out["cases"].append(row)
                    torch.cuda.empty_cache()
    return out
