"""Bit packing of quantization codes into 32-bit words (docs/02-quantization.md, definition 2.4).

Layout, for ``b``-bit codes (``1 <= b <= 8``) packed along the last axis of an
array::

    cpw = 32 // b                      codes per word (1:32 2:16 3:10 4:8 5:6 6:5 7:4 8:4)
    code k of a row  ->  word  k // cpw,  bits [(k % cpw) * b, (k % cpw) * b + b)

Bits are counted from the least significant bit of the ``uint32`` word
(code 0 of a word sits in its lowest ``b`` bits).  A code never straddles two
words: for 3, 5, 6 and 7 bits the ``32 - cpw * b`` high bits of every word are
unused and zero.  When the row length ``n`` is not a multiple of ``cpw`` the
last word is completed with zero codes ("padding codes").

Example (2-bit codes ``[1, 2, 3, 0]``)::

    bit   31 ...  8 | 7 6 | 5 4 | 3 2 | 1 0
    value   0 ... 0 | 0 0 | 1 1 | 1 0 | 0 1     = 0b00111001 = 57 = 0x39
    code            |  k=3|  k=2|  k=1|  k=0

Accepted code dtypes: any integer dtype (signed or unsigned) whose values are
all in ``[0, 2**b - 1]``; ``bool`` and floating dtypes are rejected with a
``TypeError``.  Words must be ``uint32``.  Unpacked codes are ``uint8``.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["codes_per_word", "packed_length", "pack_codes", "unpack_codes", "check_bits", "check_length"]

#: Bits in one storage word.
WORD_BITS = 32


def check_bits(bits, lo: int = 1, hi: int = 8, name: str = "bits") -> int:
    """Validate a bit width and return it as a Python int.

    Parameters
    ----------
    bits : int (Python or numpy integer, not bool)
    lo, hi : int, inclusive range allowed.
    name : str, the argument name used in error messages.

    Raises
    ------
    ValueError
        If ``bits`` is not an integer or lies outside ``[lo, hi]``.
    """
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, numbers.Integral):
        raise ValueError(f"{name} must be an int in {lo}..{hi}, got {bits!r} ({type(bits).__name__})")
    if not lo <= int(bits) <= hi:
        raise ValueError(f"{name}={bits} is out of range; allowed: {lo}..{hi}")
    return int(bits)


def check_length(n, name: str = "n") -> int:
    """``n`` (codes per row) as an int >= 0; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise ValueError(f"{name} must be an int >= 0, got {n!r} ({type(n).__name__})")
    if n < 0:
        raise ValueError(f"{name}={n} is negative; it must be the number of codes per row (>= 0)")
    return int(n)


def codes_per_word(bits: int) -> int:
    """Number of ``b``-bit codes stored in one 32-bit word: ``cpw = 32 // b``.

    >>> [codes_per_word(b) for b in range(1, 9)]
    [32, 16, 10, 8, 6, 5, 4, 4]
    """
    bits = check_bits(bits)
    return WORD_BITS // bits


def packed_length(n: int, bits: int) -> int:
    """Number of words holding ``n`` codes of ``b`` bits: ``ceil(n / cpw)``.

    >>> packed_length(64, 2), packed_length(65, 2), packed_length(0, 3)
    (4, 5, 0)
    """
    n = check_length(n)
    cpw = codes_per_word(bits)
    return -(-n // cpw)


def _check_codes(codes, bits: int) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype == np.bool_ or codes.dtype.kind not in "ui":
        raise TypeError(f"codes must have an integer dtype (uint8 preferred), got {codes.dtype}")
    if codes.ndim < 1:
        raise ValueError("codes must have at least 1 dimension (codes are packed along the last axis), "
                         "got a 0-d array")
    if codes.size:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > (1 << bits) - 1:
            raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}; "
                             f"found values in [{lo}, {hi}]")
    return codes


def pack_codes(codes, bits: int) -> np.ndarray:
    """Pack ``b``-bit codes along the last axis into little-endian ``uint32`` words.

    ``words[..., w] = sum_j codes[..., w * cpw + j] << (j * b)`` for
    ``j = 0 .. cpw-1``, with codes beyond the row length taken as 0.

    Parameters
    ----------
    codes : integer array ``(..., n)`` with values in ``[0, 2**b - 1]``.
    bits : int ``b`` in 1..8.

    Returns
    -------
    words : uint32 array ``(..., packed_length(n, b))``.

    Raises
    ------
    TypeError
        ``codes`` is not of an integer dtype.
    ValueError
        ``bits`` outside 1..8, ``codes`` 0-d, or a code outside ``[0, 2**b - 1]``.
    """
    bits = check_bits(bits)
    codes = _check_codes(codes, bits)
    cpw = codes_per_word(bits)
    n = codes.shape[-1]
    n_words = packed_length(n, bits)
    padded = np.zeros(codes.shape[:-1] + (n_words * cpw,), dtype=np.uint32)
    padded[..., :n] = codes
    slots = padded.reshape(codes.shape[:-1] + (n_words, cpw))
    shifts = (np.arange(cpw, dtype=np.uint32) * np.uint32(bits)).astype(np.uint32)
    shifted = slots << shifts
    return np.bitwise_or.reduce(shifted, axis=-1, initial=np.uint32(0)).astype(np.uint32)


def unpack_codes(words, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``(..., packed_length(n, b))`` uint32 -> ``(..., n)`` uint8.

    ``codes[..., k] = (words[..., k // cpw] >> ((k % cpw) * b)) & (2**b - 1)``.

    The unused bits (padding codes after position ``n`` and the high
    ``32 - cpw * b`` bits) must be zero: nonzero ones mean the words were not
    written by :func:`pack_codes` (or a conforming port) and raise
    ``ValueError`` instead of being dropped silently.

    Parameters
    ----------
    words : uint32 array ``(..., W)`` with ``W == packed_length(n, b)``.
    bits : int ``b`` in 1..8.
    n : int >= 0, codes per row.

    Returns
    -------
    codes : uint8 array ``(..., n)``.

    Raises
    ------
    TypeError
        ``words`` is not ``uint32``.
    ValueError
        bad ``bits`` or ``n``, ``words.shape[-1]`` inconsistent with ``n``,
        or nonzero unused bits.
    """
    bits = check_bits(bits)
    n = check_length(n)
    words = np.asarray(words)
    if words.dtype != np.uint32:
        raise TypeError(f"words must be a uint32 array, got {words.dtype}")
    if words.ndim < 1:
        raise ValueError("words must have at least 1 dimension, got a 0-d array")
    n_words = packed_length(n, bits)
    if words.shape[-1] != n_words:
        raise ValueError(f"words.shape[-1]={words.shape[-1]} does not match n={n} codes of "
                         f"{bits} bits; expected packed_length(n, bits)={n_words} words")
    cpw = codes_per_word(bits)
    mask = np.uint32((1 << bits) - 1)
    shifts = (np.arange(cpw, dtype=np.uint32) * np.uint32(bits)).astype(np.uint32)
    slots = (words[..., :, None] >> shifts) & mask          # (..., W, cpw)
    flat = slots.reshape(words.shape[:-1] + (n_words * cpw,))
    used_bits = cpw * bits
    if used_bits < WORD_BITS and words.size and np.any(words >> np.uint32(used_bits)):
        raise ValueError(f"words have nonzero unused high bits (bits {used_bits}..31 must be 0 "
                         f"for {bits}-bit codes)")
    if np.any(flat[..., n:]):
        raise ValueError(f"words have nonzero padding codes after position n={n}; "
                         "padding codes must be 0 (is n right?)")
    return flat[..., :n].astype(np.uint8)
