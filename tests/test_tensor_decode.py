"""The tensor-core decode kernel (accelerated/attention_tc_kernels.py) against the reference.

Each case quantizes random keys and values with the reference (a sink-like key, empty slots, rows of
different lengths, a query that sees no key), runs the kernel through
``tensor_decode_partial_attention`` and checks the normalised output against ``RA.attention`` over
the dequantized cache within docs/09-tolerances.md 9.3, with the constants 9.5 states for this
kernel: tensor-core sums (``u_acc = 6u``), the dequantization's FMA difference (9.3), on a
dequantized side TF32 splits (``u_in = u_p = u_v = 2^-21``), on a folded side exact bfloat16
products and its input difference: keys ``(3D + 5)u(|code*s| + |z|)``, values
``(BT + 1)u(|code*s| + |z|)`` (``tensor_constants``, ``fold_diff``, ``value_fold_diff``).
Runs where the kernels run (CUDA, or CPU under ``TRITON_INTERPRET=1``: the interpreter's dot is
a float32 numpy product, so there it checks the algorithm, not the bfloat16 / TF32 arithmetic
nor the inline PTX that unpacks the codes on the GPU).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference import attention as RA
from reference import quantize as RQ

from accelerated import attention as AA
from accelerated import quantize as AQ
from accelerated.attention_launch import tensor_decode_applies, tensor_decode_launch
from accelerated.attention_tc_kernels import tensor_decode_partial_attention
from tests.conftest import KERNEL_DEVICE, needs_kernel
from tests.test_accelerated_ops import attention_bound, quantized_case
from tests.test_decode_kernels import (U_ACC_TENSOR, fma_diff, fold_diff, tensor_constants,
                                      value_fold_diff)

pytestmark = needs_kernel

CASES = [  # key (bits, G, axis, sym), value (bits, G, axis, sym), head dim, block_t, fold, vfold
    ((2, 32, "channel", False), (2, 32, "token", False), 64, None, None, None),  # KIVI, both folded
    ((2, 32, "channel", False), (2, 32, "token", False), 64, 64, None, None),    # BT > G: keys not
    ((4, 16, "channel", True), (4, 8, "token", True), 32, 16, None, None),       # symmetric
    ((4, 64, "channel", False), (2, 16, "channel", False), 64, 32, None, None),  # values per channel
    ((8, 32, "token", False), (1, 64, "token", False), 64, 32, None, None),      # keys per token
    ((2, 32, "channel", False), (4, 32, "token", True), 128, 32, False, None),   # key fold off
    ((2, 32, "channel", False), (2, 32, "token", False), 128, 32, None, False),  # value fold off
    ((2, 32, "channel", False), (2, 8, "token", False), 64, 32, None, None),     # 8 value groups
]


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x)).to(KERNEL_DEVICE)


@pytest.mark.parametrize("kspec,vspec,d,block_t,fold,vfold", CASES)
@pytest.mark.parametrize("tq", [1, 3])
def test_tensor_decode_within_the_bound(kspec, vspec, d, block_t, fold, vfold, tq):
    rng = np.random.default_rng(kspec[0] * 100 + vspec[0] * 10 + d + tq)
    q, kq, vq, kp, qp, kv = quantized_case(rng, kspec, vspec, s=300, d=d, tq=tq)
    kd, vd = RQ.dequantize(kq), RQ.dequantize(vq)
    pk = AQ.PackedQuantizedTensor.from_reference(kq, KERNEL_DEVICE)
    pv = AQ.PackedQuantizedTensor.from_reference(vq, KERNEL_DEVICE)
    assert tensor_decode_applies(q.shape, pk, pv)
    launch = tensor_decode_launch(q.shape, pk, pv, KERNEL_DEVICE, block_t=block_t, fold=fold,
                                  value_fold=vfold, n_split=3)        # several tiles per program
    assert launch.tiles_per_split > 1
    folded = kspec[2] == "channel" and kspec[1] % launch.block_t == 0 and fold is not False
    assert launch.key_fold == folded
    kpos = np.where(kv, kp, -1)
    m, l, acc = tensor_decode_partial_attention(_t(q), pk, pv, _t(qp), _t(kpos), 1 / math.sqrt(d),
                                                launch=launch)
    got = AA.merge_partials([(m.cpu(), l.cpu(), acc.cpu())]).numpy()
    want = RA.attention(q, kd, vd, query_positions=qp, key_positions=kpos)
    assert launch.value_fold == (vspec[2] == "token" and d % vspec[1] == 0
                                 and d // vspec[1] <= launch.value_rows and vfold is not False)
    dk = fma_diff(kq, kd) + (fold_diff(kq) if folded else 0.0)
    dv = fma_diff(vq, vd) + (value_fold_diff(vq, launch.block_t) if launch.value_fold else 0.0)
    u_in, u_p, u_v = tensor_constants(launch)
    tol = attention_bound(q, [kd], [vd], u_in=u_in, u_p=u_p, u_v=u_v, dk=[dk], dv=float(dv.max()),
                          u_acc=U_ACC_TENSOR)
    blind = qp < 0                                             # a query that sees no key: exactly 0
    assert blind.any() == (tq == 3) and (got.transpose(0, 2, 1, 3)[blind] == 0).all()
    assert np.abs(got - want).max() <= tol


def test_tensor_decode_applies_only_where_whole_words_fill_a_power_of_two_head():
    k = AQ.quantize_packed(torch.randn(1, 2, 40, 64), 2, 32, "channel")
    v3 = AQ.quantize_packed(torch.randn(1, 2, 40, 64), 3, 32, "token")
    assert tensor_decode_applies((1, 8, 1, 64), k, k)
    assert not tensor_decode_applies((1, 8, 1, 64), k, v3)            # 10 codes per word
    assert not tensor_decode_applies((1, 34, 1, 64), k, k)            # 17 rows per KV head
    k80 = AQ.quantize_packed(torch.randn(1, 2, 40, 80), 2, 16, "channel")
    assert not tensor_decode_applies((1, 8, 1, 80), k80, k80)        # head dim not a power of two


def test_the_kivi_decode_shapes_fold_both_sides():
    """Llama-3-8B (4 query rows per KV head) and Llama-2-7B (1) in KIVI's layout, D = 128, groups
    of 32: keys fold (the tile is the key group) and values fold (4 groups in VREP = 4 rows per
    query row), so neither side is dequantized (docs/09 9.5)."""
    for hq in (32, 8):
        x = torch.zeros((1, 8, 64, 128), device=KERNEL_DEVICE)
        pk, pv = AQ.quantize_packed(x, 2, 32, "channel"), AQ.quantize_packed(x, 2, 32, "token")
        launch = tensor_decode_launch((1, hq, 1, 128), pk, pv, KERNEL_DEVICE)
        assert launch.key_fold and launch.value_fold and launch.value_rows == 4
