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
    AK.quantized_partial_attention(q, pk, pv, qp, kp, 1 / math.sqrt(d), "tf32x3")
    AK2.quantized_partial_attention(q, pk, pv, qp, kp, 1 / math.sqrt(d), "ieee")
    torch.cuda.synchronize()
    print("ok", b, h, hq, tq, t_len, d, kspec, vspec, flush=True)
print("sanitize runs done")
