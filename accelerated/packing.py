"""Bit packing of codes, torch twin of ``reference/packing.py`` (docs/02-quantization.md §2.4).

Same layout as the reference: ``cpw = 32 // b`` codes per 32-bit word, code
``k`` of a row in word ``k // cpw`` at bits ``[(k % cpw) * b, (k % cpw) * b + b)``,
least significant bits first; unused high bits and padding codes are zero.

Storage dtype (the one deviation, forced by torch)
--------------------------------------------------
torch (2.4 .. 2.13) has a ``torch.uint32`` dtype but almost no operators for
it (no shifts, no bitwise ops on CPU in older releases), so packed words are
stored as **torch.int32 holding the same 32-bit pattern**: a word whose
reference value is ``u`` (uint32) is stored as the int32 ``u - 2**32`` when
``u >= 2**31``.  The mapping is a reinterpretation, never an arithmetic
conversion::

    reference words (numpy uint32)  ->  torch:  torch.from_numpy(words.view(np.int32))
    torch words (int32)             ->  numpy:  words.cpu().numpy().view(np.uint32)

:func:`words_from_reference` and :func:`words_to_reference` do exactly this.
Unpacking masks after the (arithmetic) right shift, so the sign bit never
leaks into a code.

All functions accept tensors on any device and return tensors on the device
of their input.  Validation errors are those of the reference (same types,
same wording), with ``uint32`` read as "int32 (uint32 bit pattern)".
"""

from __future__ import annotations


import numpy as np
import torch

from reference.packing import WORD_BITS, check_bits, check_length, codes_per_word, packed_length

__all__ = [
    "check_bits",
    "check_length",
    "codes_per_word",
    "packed_length",
    "pack_codes",
    "unpack_codes",
    "words_from_reference",
    "words_to_reference",
    "WORD_DTYPE",
]

#: torch dtype of packed words: int32 carrying the uint32 bit pattern of the reference.
WORD_DTYPE = torch.int32

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)




def words_from_reference(words) -> torch.Tensor:
    """numpy ``uint32`` words of the reference -> torch ``int32`` tensor with the same bits."""
    arr = np.asarray(words)
    if arr.dtype != np.uint32:
        raise TypeError(f"words must be a numpy uint32 array (reference layout), got {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr).view(np.int32).copy())


def words_to_reference(words: torch.Tensor) -> np.ndarray:
    """torch ``int32`` words -> numpy ``uint32`` array with the same bits (the reference layout)."""
    if not isinstance(words, torch.Tensor) or words.dtype != WORD_DTYPE:
        raise TypeError("words must be a torch.int32 tensor (uint32 bit pattern), got "
                        f"{getattr(words, 'dtype', type(words).__name__)}")
    return words.detach().cpu().contiguous().numpy().view(np.uint32).copy()


def _check_codes(codes, bits: int) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch tensor of an integer dtype (uint8 preferred), "
                        f"got {type(codes).__name__}")
    if codes.dtype in _WIDE_UNSIGNED:
        # torch has few kernels for uint16/32/64 (no min/max): check and pack their int64 copy;
        # a value >= 2**63 wraps negative there and is refused by the range check below
        codes = codes.to(torch.int64)
    elif codes.dtype not in _INT_DTYPES:
        raise TypeError(f"codes must have an integer dtype (uint8 preferred), got {codes.dtype}")
    if codes.dim() < 1:
        raise ValueError("codes must have at least 1 dimension (codes are packed along the last axis), "
                         "got a 0-d array")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > (1 << bits) - 1:
            raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}; "
                             f"found values in [{lo}, {hi}]")
    return codes


def _to_int32_bits(w64: torch.Tensor) -> torch.Tensor:
    """int64 values in ``[0, 2**32)`` -> int32 with the same low 32 bits (explicit wrap)."""
    return torch.where(w64 >= 2 ** 31, w64 - 2 ** 32, w64).to(WORD_DTYPE)


def pack_codes(codes: torch.Tensor, bits: int, *, validate: bool = True) -> torch.Tensor:
    """Pack ``b``-bit codes along the last axis: ``(..., n)`` -> int32 ``(..., packed_length(n, b))``.

    ``words[..., w] = sum_j codes[..., w * cpw + j] << (j * b)`` (as uint32 bits).

    ``validate=False`` skips the range check of the codes (one device->host
    sync); callers that produced the codes themselves (the quantizers) use it.
    """
    bits = check_bits(bits)
    if validate:
        codes = _check_codes(codes, bits)
    cpw = codes_per_word(bits)
    n = codes.shape[-1]
    n_words = packed_length(n, bits)
    lead = tuple(codes.shape[:-1])
    padded = torch.zeros(lead + (n_words * cpw,), dtype=torch.int64, device=codes.device)
    padded[..., :n] = codes.to(torch.int64)
    slots = padded.reshape(lead + (n_words, cpw))
    shifts = torch.arange(cpw, dtype=torch.int64, device=codes.device) * bits
    # fields do not overlap, so the sum is the bitwise or
    w64 = (slots << shifts).sum(dim=-1)
    return _to_int32_bits(w64)


def _unpack_all(words: torch.Tensor, bits: int) -> torch.Tensor:
    """All ``W * cpw`` code slots of ``words`` as int64 ``(..., W * cpw)`` (padding included)."""
    cpw = WORD_BITS // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(cpw, dtype=torch.int32, device=words.device) * bits
    slots = (words.unsqueeze(-1) >> shifts) & mask           # arithmetic shift, then mask
    return slots.reshape(tuple(words.shape[:-1]) + (words.shape[-1] * cpw,))


def unpack_codes(words: torch.Tensor, bits: int, n: int, *, validate: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``(..., packed_length(n, b))`` -> uint8 ``(..., n)``.

    As in the reference, nonzero unused bits (high bits, padding codes) raise
    ``ValueError``; ``validate=False`` skips that check (it costs a device->host
    sync) for words this package wrote itself.
    """
    bits = check_bits(bits)
    n = check_length(n)
    if not isinstance(words, torch.Tensor):
        raise TypeError(f"words must be a torch.int32 tensor (uint32 bit pattern), "
                        f"got {type(words).__name__}")
    if words.dtype != WORD_DTYPE:
        raise TypeError(f"words must be a torch.int32 tensor (uint32 bit pattern; see "
                        f"accelerated.packing.words_from_reference), got {words.dtype}")
    if words.dim() < 1:
        raise ValueError("words must have at least 1 dimension, got a 0-d array")
    n_words = packed_length(n, bits)
    if words.shape[-1] != n_words:
        raise ValueError(f"words.shape[-1]={words.shape[-1]} does not match n={n} codes of "
                         f"{bits} bits; expected packed_length(n, bits)={n_words} words")
    cpw = codes_per_word(bits)
    flat = _unpack_all(words, bits)
    if validate and words.numel():
        used_bits = cpw * bits
        if used_bits < WORD_BITS and bool(((words >> used_bits) & ((1 << (WORD_BITS - used_bits)) - 1)).any()):
            raise ValueError(f"words have nonzero unused high bits (bits {used_bits}..31 must be 0 "
                             f"for {bits}-bit codes)")
        if bool(flat[..., n:].any()):
            raise ValueError(f"words have nonzero padding codes after position n={n}; "
                             "padding codes must be 0 (is n right?)")
    return flat[..., :n].to(torch.uint8)
