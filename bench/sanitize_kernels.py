"""Run every Triton kernel of accelerated/ once on small inputs, for compute-sanitizer:

    compute-sanitizer --tool memcheck python3 bench/sanitize_kernels.py

Shapes are chosen so that the last split has tiles past T, several batches and heads exist and
the last (batch, head) block of every buffer is touched (out-of-bounds reads at the end of a
buffer do not fault on an ordinary run).  Exits 0 when all runs finish; memcheck reports errors.
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from accelerated import attention_kernels as AK            # noqa: E402
from accelerated import quantize as AQ                     # noqa: E402
from accelerated.attention_launch import fused_launch, tensor_decode_applies      # noqa: E402
from accelerated.decode_kernels import fused_decode_attention  # noqa: E402
from bench.bench_kernels import load_version               # noqa: E402

AK2 = load_version("attention_kernels_v2")                 # the v2 kernel + torch merge (history)

torch.manual_seed(0)
dev = "cuda"
for (b, h, hq, tq, t_len, d, kspec, vspec) in [
        (3, 2, 8, 1, 200, 128, (2, 32, "channel", False), (2, 32, "token", False)),
        (2, 3, 9, 1, 77, 64, (4, 16, "channel", True), (3, 16, "token", False)),
        (1, 2, 4, 3, 50, 70, (3, 7, "token", False), (5, 5, "channel", True)),
        (2, 2, 8, 4, 100, 64, (2, 32, "channel", False), (2, 32, "token", False))]:
    k = torch.randn(b, h, t_len, d, device=dev)
    v = torch.randn(b, h, t_len, d, device=dev)
    pk = AQ.quantize_packed(k, kspec[0], kspec[1], kspec[2], symmetric=kspec[3])
    pv = AQ.quantize_packed(v, vspec[0], vspec[1], vspec[2], symmetric=vspec[3], validate=False)
    q = torch.randn(b, hq, tq, d, device=dev)
    kp = torch.arange(t_len, device=dev).repeat(b, 1)
    qp = torch.full((b, tq), t_len, device=dev)
    for kw in (dict(), dict(prefetch=False), dict(a=1, rb=2), dict(num_warps=1, target_programs=1000)):
        AK.decode_partial_attention(q, pk, pv, qp, kp, 1 / math.sqrt(d), **kw)
    # the fused decode kernel: preserved (3 columns, row 0 holding 2) and residual (9 tokens, the
    # last row's first 4 padding) as views ending at their buffers' ends, plus an empty store
    pk_buf = torch.randn(b, h, 3, d, device=dev).to(torch.bfloat16)
    ppos = torch.tensor([[1, 5, -1]] + [[0, 2, 7]] * (b - 1), device=dev)
    rk_buf = torch.randn(b, h, 12, d, device=dev).to(torch.bfloat16)
    valid = torch.ones(b, 12, dtype=torch.bool, device=dev)
    valid[-1, 3:7] = False
    if hq // h * tq <= 8:
        segs = ((pk_buf, pk_buf.clone(), ppos), (rk_buf[:, :, 3:], rk_buf[:, :, 3:].clone(), valid[:, 3:], t_len))
        variants = [dict(engine="cuda-core"), dict(engine="cuda-core", a=1, rb=2),
                    dict(engine="cuda-core", num_warps=8)]
        if tensor_decode_applies(q.shape, pk, pv):
            variants += [dict(engine="tensor"), dict(engine="tensor", num_warps=4, block_t=16)]
        for kw in variants:
            fl = fused_launch(q.shape, pk, pv, 12, dev, fp_block=8, **kw)
            fused_decode_attention(q, qp + 9, 1 / math.sqrt(d), (pk, pv, kp), *segs, launch=fl)
        empty = [AQ.quantize_packed(torch.zeros(b, h, 0, d, device=dev), *spec[:3], symmetric=spec[3])
                 for spec in (kspec, vspec)]
        fused_decode_attention(q, qp + 9, 1 / math.sqrt(d), (*empty, kp[:, :0]), *segs,
                               out_dtype=torch.bfloat16)
    AK.quantized_partial_attention(q, pk, pv, qp, kp, 1 / math.sqrt(d), "tf32x3")
    AK2.quantized_partial_attention(q, pk, pv, qp, kp, 1 / math.sqrt(d), "ieee")
    torch.cuda.synchronize()
    print("ok", b, h, hq, tq, t_len, d, kspec, vspec, flush=True)
print("sanitize runs done")
