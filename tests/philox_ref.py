"""An independent NumPy Philox4x32-10 and the dropout rule every GPU backend follows
(fbp_kernels/backends/triton_dropout.py; the CUDA kernels' fbp_math.cuh), shared by
tests/test_dropout_stream.py and tests/test_cuda_backend.py."""

import numpy as np

M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) on uint64 arrays holding 32-bit words:
    ``counter`` (4, N), ``key`` (2,) -> (4, N)."""
    c = [np.asarray(w, dtype=np.uint64) & M32 for w in counter]
    k0, k1 = np.uint64(key[0]) & M32, np.uint64(key[1]) & M32
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]  # exact in uint64: 32 x 32 bits
        p2 = np.uint64(0xCD9E8D57) * c[2]
        c = [((p2 >> np.uint64(32)) ^ c[1] ^ k0) & M32, p2 & M32,
             ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & M32, p0 & M32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & M32
    return np.stack(c)


def expected_keep(seed: int, rows: int, ko: int, rate: float, row0: int = 0) -> np.ndarray:
    """The documented rule: element (r, c) takes word ``c % 4`` of Philox(counter =
    (lo32(g), hi32(g), 0, 0), key = (lo32(seed), hi32(seed))), ``g = r*ceil(ko/4) + c//4``,
    as Triton's uint_to_uniform_float, and is kept when that is >= rate (fp32)."""
    r = np.arange(row0, row0 + rows, dtype=np.uint64)[:, None]
    c = np.arange(ko, dtype=np.uint64)[None, :]
    g = (r * np.uint64((ko + 3) // 4) + c // np.uint64(4)).ravel()
    s = np.uint64(seed % 2 ** 64)
    words = philox4x32_10([g & M32, g >> np.uint64(32), 0 * g, 0 * g], (s & M32, s >> np.uint64(32)))
    lane = (c % np.uint64(4)).astype(np.int64) + np.zeros((rows, 1), dtype=np.int64)
    word = words[lane.ravel(), np.arange(g.size)].astype(np.uint32).view(np.int32)
    word = np.where(word < 0, ~word, word)
    u = word.astype(np.float32) * np.float32(4.6566127342e-10)
    return (u >= np.float32(rate)).reshape(rows, ko)
