"""The Triton kernels' dropout stream: one Philox call per four elements.

Every Triton kernel (the first fused kernels, the wide kernels, the split epilogue, MFH,
the mask kernel tests use) draws the keep-mask of the ``(rows, K*o)`` product with the
rule written here, so switching kernels or strategies never changes the random stream.

Element ``(row, col)`` belongs to group ``g = row * ceil(K*o / 4) + col // 4``
(four consecutive columns of one row; a row's last group may be short) and is kept when

    u = uniform(word[col % 4] of philox4x32_10(counter = (lo32(g), hi32(g), 0, 0),
                                                key = (lo32(seed), hi32(seed))))
    u >= p

``uniform`` is Triton's ``uint_to_uniform_float`` (the word as int32, negative values
bit-flipped, times 4.6566127342e-10 in fp32), i.e. what ``tl.rand`` returns for one word.
A pure function of (seed, row, col), hence of (seed, element index); ``g`` is int64
where the kernels' row index is (past 2^31 elements).

Why four per call: Philox4x32-10 makes four 32-bit words per evaluation (ten rounds of
two 32x32 multiplies) and ``tl.rand`` keeps one.  Drawing one word per element cost the
wide backward's 128 x 128 / 16-warp tile 300-700 B of register spills on sm_90 (the
Philox temporaries of 32 elements per thread); :func:`keep_tile` evaluates one Philox
per four elements of a tile and that tile compiles without spills.  Kernels whose tiles
do not hold whole aligned groups (columns strided by K) use :func:`keep_elements`: the
same words, one evaluation per element.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _groups_per_row(KO):
    return (KO + 3) // 4


@triton.jit
def _uniform(word):
    return tl.random.uint_to_uniform_float(word)


@triton.jit
def _philox_word(seed, g, lane):
    """Word ``lane`` (0-3) of Philox4x32-10 on counter ``(lo32(g), hi32(g), 0, 0)`` with
    key ``(lo32(seed), hi32(seed))``: bitwise ``tl.randint4x(seed, g)[lane]``.

    Rounds 9 and 10 form only what the selected word needs, so at most three state words
    are live at the end, as for ``tl.rand``'s single word (keeping all four words and
    selecting afterwards cost the split epilogue and the first kernel's backward 8-128 B
    of spills).  With round-9 state ``(a0, a1, a2, a3)`` and round keys ``K9``, ``K10``:
    words 0/1 need ``b1 = lo(B a2)``, ``b2 = hi(A a0) ^ a3 ^ K9.1``; words 2/3 need
    ``b0 = hi(B a2) ^ a1 ^ K9.0``, ``b3 = lo(A a0)``; then word 0 = ``hi(B b2) ^ b1 ^
    K10.0``, 1 = ``lo(B b2)``, 2 = ``hi(A b0) ^ b3 ^ K10.1``, 3 = ``lo(A b0)``."""
    if g.dtype.primitive_bitwidth > 32:
        c0 = g.to(tl.uint32)
        c1 = (g >> 32).to(tl.uint32)
    else:
        c0 = g.to(tl.uint32)
        c1 = c0 * 0
    zero = c0 * 0
    # A kernel argument (i64), but one equal to 1 reaches a GPU build as the constexpr
    # 1 (Triton specialises integer arguments of value 1; the interpreter does not), and
    # a constexpr has no .to: make it a tensor first.
    seed = tl.cast(seed, tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    a0, a1, a2, a3 = tl.random.philox_impl(c0, c1, zero, zero, k0, k1, 8)
    first = lane < 2  # words 0, 1
    mul_a = zero + 0xD2511F53  # Philox's round multipliers (A on word 0, B on word 2)
    mul_b = zero + 0xCD9E8D57
    u = tl.where(first, a3, a1)
    x = tl.where(first, tl.math.umulhi(mul_a, a0) ^ (k1 + (8 * 0xBB67AE85) % 2 ** 32),
                 tl.math.umulhi(mul_b, a2) ^ (k0 + (8 * 0x9E3779B9) % 2 ** 32)) ^ u
    y = tl.where(first, mul_b * a2, mul_a * a0)
    m = tl.where(first, mul_b, mul_a)
    hi = tl.math.umulhi(m, x) ^ y ^ tl.where(first, k0 + (9 * 0x9E3779B9) % 2 ** 32,
                                             k1 + (9 * 0xBB67AE85) % 2 ** 32)
    return tl.where((lane % 2) == 1, m * x, hi)


@triton.jit
def keep_elements(seed, rows, cols, KO, drop_p):
    """Keep-mask of elements ``(rows, cols)`` (int tensors broadcast against each other;
    int64 ``rows`` past 2^31 elements) of a ``(rows, KO)`` product."""
    cols = cols.to(tl.int32)  # < K*o < 2^31; int32 lane and group arithmetic
    g = rows * _groups_per_row(KO) + cols // 4
    return _uniform(_philox_word(seed, g, cols % 4)) >= drop_p


@triton.jit
def keep_tile(seed, rows, col0, KO, drop_p, BLOCK_N: tl.constexpr):
    """Keep-mask of the ``(len(rows), BLOCK_N)`` tile at columns ``col0 + arange(BLOCK_N)``,
    ``col0`` a multiple of 4: one Philox evaluation per four elements, its words
    interleaved so column ``col0 + 4i + l`` takes word ``l`` of group ``i``."""
    g = rows[:, None] * _groups_per_row(KO) + (col0 // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, g)
    # X = join(join(w0, w2), join(w1, w3)) has X[..., i, a, b] = w_{2a + b} (the outer
    # join's last axis b picks the pair, the inner one's a the member), so row-major
    # (i, a, b) -> column 4i + 2a + b takes word 2a + b.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (rows.shape[0], BLOCK_N))
    return _uniform(words) >= drop_p
