"""A compressed, lossless container for ONNX files: the storage stage of Han et al.'s
"Deep Compression" (2016) -- canonical Huffman coding of weight indices, relative-index
sparse storage -- applied to the initializers of any ONNX model.

API: :func:`pack` / :func:`pack_file` (-> container bytes + :class:`PackStats`),
:func:`unpack` / :func:`unpack_file` (-> the original ONNX bytes, byte for byte).
CLI: ``nnsculpt pack MODEL.onnx -o M.nnz [--json]`` and ``nnsculpt unpack M.nnz -o M.onnx``.

How a file is packed
    The ONNX protobuf is parsed (external data is not loaded) and every tensor of at least
    :data:`MIN_TENSOR_BYTES` bytes -- initializers, ``sparse_initializer`` values / indices,
    tensor attributes (``Constant``...), in subgraphs and functions too -- has its payload
    taken out (``raw_data``, or the typed ``float_data`` / ``int32_data`` / ... field turned
    into little-endian bytes). The rest of the ModelProto, with those payloads cleared, is
    serialized and LZMA'd; each payload is coded with the smallest of (ties: this order):

    ``raw``            LZMA2 of the bytes, or the bytes as they are if LZMA does not help;
    ``bytesplit``      (element size > 1) LZMA2 of the byte planes (all first bytes, all second
                       bytes...): exponent / sign bytes of floats compress far better apart;
    ``huffman-bytes``  (1-byte elements: int8 / uint8 weights, cluster indices) a canonical
                       Huffman code over the 256 byte values;
    ``palette``        (element size > 1, at most 256 distinct bit patterns, so -0.0 and NaN
                       payloads survive) the table of distinct values + Huffman-coded indices;
    ``sparse``         (>= 30 % of the elements are bit-pattern zero) Han et al.'s relative
                       indices: the gap before each non-zero, capped at 2^b-1 -- a larger gap
                       emits escape symbols 2^b-1 ("skip 2^b-1 zeros", Han's filler zero
                       without its value) -- Huffman-coded, b in 1..12 picked for the smallest
                       size; the non-zero values coded with the best of the codings above.
                       Without 30 % zeros, the most frequent bit pattern is the background
                       value instead if it is that common (the zero centroid's index in the
                       codes of a pruned + clustered weight).

    The container is then unpacked again in memory and compared with the input. Re-serializing
    a parsed protobuf does not always give the same bytes (another writer's field order,
    unknown fields...); when it does not, when the model uses external data, or when it would
    be larger, the container is mode ``raw`` instead: the xz stream (preset 9e) of the whole
    file. In either mode :func:`unpack` returns the original bytes, checked with SHA-256.

Huffman coding (:func:`huffman_encode` / :func:`huffman_decode`)
    Code lengths from a heapq-built tree (ties broken by symbol, so deterministic), limited to
    :data:`MAX_CODE_LEN` = 16 bits by halving the counts until they fit (costs well under 1 %
    on the skewed tails where it triggers); canonical codes (shorter first, then by symbol),
    MSB first. The stream is cut into blocks of :data:`BLOCK` symbols whose bit lengths are
    stored (16 bits per 2048 symbols, < 0.01 bit/symbol), so decoding runs all blocks in
    lock step with numpy: one 2^16-entry table lookup on a 16-bit window per step, 2048 steps
    whatever the size. One used symbol: no bit stream at all.

Container layout (version 1; integers little-endian)::

    0       4  magic b"NNZ1"
    4       2  u16 version (1)
    6       4  u32 H: header size
    10      8  u64 B: body size
    18      H  header: raw LZMA2 of compact JSON {"mode", "size", "model", "tensors": [[walk
               index, field, section size], ...]}  (mode "raw": {"mode", "size", "raw": B})
    18+H    B  body: mode "tensors": the LZMA2'd stripped ModelProto, then one section per
               tensor; mode "raw": an xz stream of the whole file
    18+H+B 32  SHA-256 of the original ONNX bytes
    +32    32  SHA-256 of every byte before this field

    A section: u8 coding, u8 element size, varint payload bytes, the coding's data (raw:
    u8 stored/lzma + bytes; bytesplit: LZMA2 stream; huffman-bytes: Huffman blob; palette:
    varint k, k values, Huffman blob of indices; sparse: u8 b, background value, varint non-zeros, Huffman blob
    of gap symbols, nested section of the values). A Huffman blob: varint symbols, varint
    alphabet, code-length table (dense bytes / nibbles / sparse pairs, whichever is smaller),
    then (two or more used symbols) varint bit count, u16 bit length of every block but the
    last, the bit stream.

Everything is deterministic (fixed LZMA presets, no timestamps): the same input gives the
same container. Damaged input raises :class:`~nnsculpt.ir.errors.PackError` naming the file
and the problem ("not an nnsculpt container", "truncated: expected N bytes, got M",
"checksum mismatch"); unpack never returns bytes whose SHA-256 differs from the recorded one.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
import lzma
import os
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..ir.errors import ModelLoadError, NNSculptError, PackError
from ..ir.onnx_io import write_bytes_atomic

log = logging.getLogger("nnsculpt.runtime.pack")

__all__ = ["pack", "unpack", "pack_file", "unpack_file", "PackStats", "TensorStats", "PackError",
           "huffman_code_lengths", "canonical_codes", "huffman_encode", "huffman_decode", "add_cli",
           "MAGIC", "VERSION"]

MAGIC = b"NNZ1"
VERSION = 1
_PREFIX = struct.Struct("<4sHIQ")  # magic, version, header size, body size
_TRAILER = 64  # SHA-256 of the original + SHA-256 of the container before it
MIN_TENSOR_BYTES = 256  #: smaller payloads stay in the (LZMA'd) ModelProto
MAX_CODE_LEN = 16
BLOCK = 2048  #: symbols per Huffman block (BLOCK * MAX_CODE_LEN must fit in a u16)
SPARSE_MIN_ZEROS = 0.30
_LZMA_PRESET = 9 | lzma.PRESET_EXTREME
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": _LZMA_PRESET}]

# section coding ids
_STORED, _LZMA, _BYTESPLIT, _HUFFBYTES, _PALETTE, _SPARSE = range(6)
_CODING_NAME = {_STORED: "raw", _LZMA: "raw", _BYTESPLIT: "bytesplit", _HUFFBYTES: "huffman-bytes",
                _PALETTE: "palette", _SPARSE: "sparse"}

# where a payload came from / goes back to: field name, numpy dtype of the stored elements
_FIELDS: dict[int, tuple[str, str | None]] = {
    0: ("raw_data", None), 1: ("float_data", "<f4"), 2: ("double_data", "<f8"), 3: ("int64_data", "<i8"),
    4: ("uint64_data", "<u8"), 5: ("int32_data", "<i4"), 6: ("int32_data", "<i1"), 7: ("int32_data", "<u1"),
    8: ("int32_data", "<i2"), 9: ("int32_data", "<u2"),
}
_T = onnx.TensorProto
_INT32_NARROW = {_T.INT8: 6, _T.UINT8: 7, _T.BOOL: 7, _T.INT16: 8, _T.UINT16: 9, _T.FLOAT16: 9, _T.BFLOAT16: 9}


class _Corrupt(Exception):
    """Internal: a section does not decode (turned into PackError with the file name)."""


class _NoTensorMode(Exception):
    """Internal: the per-tensor mode cannot be used for this file (the reason is the message)."""


# =============================================================================== byte I/O
class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> None:
        self.parts.append(bytes((v,)))

    def var(self, v: int) -> None:
        out = bytearray()
        while True:
            b = v & 0x7F
            v >>= 7
            if v:
                out.append(b | 0x80)
            else:
                out.append(b)
                break
        self.parts.append(bytes(out))

    def raw(self, b: bytes) -> None:
        self.parts.append(bytes(b))

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.b = memoryview(data)
        self.p = pos
        self.end = len(self.b) if end is None else end

    def take(self, n: int) -> bytes:
        if n < 0 or self.p + n > self.end:
            raise _Corrupt(f"section ends early (needs {n} bytes at offset {self.p}, has {self.end - self.p})")
        out = bytes(self.b[self.p:self.p + n])
        self.p += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def var(self) -> int:
        v = shift = 0
        while True:
            b = self.u8()
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                return v
            shift += 7
            if shift > 63:
                raise _Corrupt("bad varint")


def _lzma(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


def _unlzma(data: bytes, expect: int | None = None) -> bytes:
    try:
        out = lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    except lzma.LZMAError as e:
        raise _Corrupt(f"LZMA stream: {e}") from None
    if expect is not None and len(out) != expect:
        raise _Corrupt(f"LZMA stream gives {len(out)} bytes, expected {expect}")
    return out


# ================================================================================ Huffman
def _tree_lengths(counts: list[int]) -> list[int]:
    """Huffman code lengths of ``counts`` (all > 0, len >= 2); ties broken by node id."""
    k = len(counts)
    heap = [(c, i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    parent = [0] * (2 * k - 1)
    nxt = k
    while len(heap) > 1:
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (c1 + c2, nxt))
        nxt += 1
    depth = [0] * nxt
    for node in range(nxt - 2, -1, -1):  # parents are created after their children
        depth[node] = depth[parent[node]] + 1
    return depth[:k]


def huffman_code_lengths(counts: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Code length (bits) of every symbol, 0 for unused ones; at most ``max_len`` bits.

    One used symbol gets length 1 (the coder then writes no bits at all). Too long codes are
    avoided by halving the counts (rounding up, so used symbols stay used) until the tree fits."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.uint8)
    used = np.flatnonzero(counts > 0)
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    if (1 << max_len) < len(used):
        raise ValueError(f"{len(used)} symbols do not fit in codes of {max_len} bits")
    c = counts[used]
    while True:
        ls = _tree_lengths(c.tolist())
        if max(ls) <= max_len:
            break
        c = (c + 1) // 2
    lengths[used] = ls
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman codes for ``lengths``: shorter codes first, equal lengths by symbol."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.uint32)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    code = prev = 0
    for s in order.tolist():
        n = int(lengths[s])
        if n == 0:
            continue
        code <<= n - prev
        codes[s] = code
        code += 1
        prev = n
    return codes


def _write_lengths(w: _Writer, lengths: np.ndarray) -> None:
    used = np.flatnonzero(lengths)
    dense = len(lengths)
    nib = (len(lengths) + 1) // 2 if lengths.max(initial=0) <= 15 else None
    sparse = _Writer()
    sparse.var(len(used))
    prev = -1
    for s in used.tolist():
        sparse.var(s - prev - 1)
        sparse.u8(int(lengths[s]))
        prev = s
    sp = sparse.getvalue()
    best = min(x for x in (dense, nib, len(sp)) if x is not None)
    if best == len(sp):
        w.u8(2)
        w.raw(sp)
    elif best == dense:
        w.u8(0)
        w.raw(lengths.astype(np.uint8).tobytes())
    else:
        w.u8(1)
        ln = np.zeros(2 * nib, dtype=np.uint8)
        ln[:len(lengths)] = lengths
        w.raw(((ln[0::2] << 4) | ln[1::2]).astype(np.uint8).tobytes())


def _read_lengths(r: _Reader, alphabet: int) -> np.ndarray:
    form = r.u8()
    if form == 0:
        lengths = np.frombuffer(r.take(alphabet), dtype=np.uint8).copy()
    elif form == 1:
        nb = np.frombuffer(r.take((alphabet + 1) // 2), dtype=np.uint8)
        lengths = np.empty(2 * len(nb), dtype=np.uint8)
        lengths[0::2], lengths[1::2] = nb >> 4, nb & 15
        lengths = lengths[:alphabet]
    elif form == 2:
        lengths = np.zeros(alphabet, dtype=np.uint8)
        s = -1
        for _ in range(r.var()):
            s += r.var() + 1
            if s >= alphabet:
                raise _Corrupt("code-length table names a symbol outside the alphabet")
            lengths[s] = r.u8()
    else:
        raise _Corrupt(f"unknown code-length table form {form}")
    if lengths.max(initial=0) > MAX_CODE_LEN:
        raise _Corrupt("code length above 16 bits")
    return lengths


def _pack_bits(codes: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate ``codes[i]`` of ``lengths[i]`` bits (MSB first) into bytes, zero padded."""
    out: list[bytes] = []
    carry = np.zeros(0, dtype=np.uint8)
    chunk = 1 << 20
    for a in range(0, len(codes), chunk):
        c = codes[a:a + chunk].astype(np.uint32)
        ln = lengths[a:a + chunk].astype(np.int64)
        start = np.cumsum(ln) - ln
        bits = np.zeros(int(ln.sum()), dtype=np.uint8)
        for j in range(int(ln.max(initial=0))):
            m = ln > j
            bits[start[m] + j] = (c[m] >> (ln[m] - 1 - j).astype(np.uint32)) & 1
        bits = np.concatenate([carry, bits])
        whole = len(bits) // 8 * 8
        out.append(np.packbits(bits[:whole]).tobytes())
        carry = bits[whole:]
    if len(carry):
        out.append(np.packbits(carry).tobytes())
    return b"".join(out)


def _huffman_layout(counts: np.ndarray, alphabet: int) -> tuple[np.ndarray, int]:
    """Code lengths and the exact size in bytes of the blob :func:`huffman_encode` writes."""
    lengths = huffman_code_lengths(counts)
    n = int(counts.sum())
    w = _Writer()
    w.var(n)
    w.var(alphabet)
    if n:
        _write_lengths(w, lengths)
    size = len(w.getvalue())
    if np.count_nonzero(lengths) >= 2:
        nbits = int((counts.astype(np.int64) * lengths[:len(counts)]).sum())
        w2 = _Writer()
        w2.var(nbits)
        size += len(w2.getvalue()) + 2 * (max(1, -(-n // BLOCK)) - 1) + (nbits + 7) // 8
    return lengths, size


def huffman_encode(symbols: np.ndarray, alphabet: int | None = None) -> bytes:
    """A self-contained canonical-Huffman blob of ``symbols`` (non-negative ints < alphabet)."""
    symbols = np.asarray(symbols).ravel()
    if alphabet is None:
        alphabet = int(symbols.max()) + 1 if len(symbols) else 1
    if len(symbols) and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise ValueError(f"symbols outside 0..{alphabet - 1}")
    counts = np.bincount(symbols, minlength=alphabet) if len(symbols) else np.zeros(alphabet, np.int64)
    lengths = huffman_code_lengths(counts)
    n = len(symbols)
    w = _Writer()
    w.var(n)
    w.var(alphabet)
    if n == 0:
        return w.getvalue()
    _write_lengths(w, lengths)
    if np.count_nonzero(lengths) < 2:
        return w.getvalue()
    codes = canonical_codes(lengths)
    sym_len = lengths[symbols]
    nbits = int(sym_len.astype(np.int64).sum())
    w.var(nbits)
    nblocks = -(-n // BLOCK)
    if nblocks > 1:
        per = np.add.reduceat(sym_len.astype(np.int64), np.arange(0, n, BLOCK))
        w.raw(per[:-1].astype("<u2").tobytes())
    w.raw(_pack_bits(codes[symbols], sym_len))
    return w.getvalue()


def _decode_table(lengths: np.ndarray) -> tuple[np.ndarray, int]:
    k = int(lengths.max())
    if int((np.left_shift(1, (MAX_CODE_LEN - lengths[lengths > 0].astype(np.int64)))).sum()) != 1 << MAX_CODE_LEN:
        raise _Corrupt("code lengths do not form a complete prefix code")
    codes = canonical_codes(lengths)
    table = np.zeros(1 << k, dtype=np.int32)
    for s in np.flatnonzero(lengths).tolist():
        n = int(lengths[s])
        lo = int(codes[s]) << (k - n)
        table[lo:lo + (1 << (k - n))] = (s << 5) | n
    return table, k


def _huffman_read(r: _Reader) -> np.ndarray:
    n = r.var()
    alphabet = r.var()
    if alphabet < 1 or alphabet > 1 << MAX_CODE_LEN:
        raise _Corrupt(f"bad Huffman alphabet size {alphabet}")
    dt = np.uint8 if alphabet <= 256 else np.uint16
    if n == 0:
        return np.zeros(0, dtype=dt)
    lengths = _read_lengths(r, alphabet)
    used = np.flatnonzero(lengths)
    if len(used) == 0:
        raise _Corrupt("empty code-length table")
    if len(used) == 1:
        return np.full(n, used[0], dtype=dt)
    nbits = r.var()
    nblocks = -(-n // BLOCK)
    per = np.frombuffer(r.take(2 * (nblocks - 1)), dtype="<u2").astype(np.int64)
    stream = r.take((nbits + 7) // 8)
    starts = np.concatenate([[0], np.cumsum(per)]).astype(np.int64)
    if starts[-1] > nbits:
        raise _Corrupt("Huffman block lengths exceed the bit stream")
    ends = np.append(starts[1:], nbits)
    table, k = _decode_table(lengths)
    b = np.frombuffer(stream + b"\0\0\0", dtype=np.uint8).astype(np.uint32)
    w24 = (b[:-2] << 16) | (b[1:-1] << 8) | b[2:]
    mask = np.uint32((1 << k) - 1)
    full, rem = divmod(n, BLOCK)
    out = np.empty((BLOCK, nblocks), dtype=dt)
    pos = starts.copy()
    active = nblocks
    shift_base = 24 - k
    try:
        for step in range(BLOCK if nblocks > 1 else n):
            if rem and step == rem:  # the short last block is done: check its end, go on without it
                if pos[-1] != ends[-1]:
                    raise _Corrupt("Huffman stream does not end where recorded")
                active = full
                pos = pos[:full]
            e = table[(w24[pos >> 3] >> (shift_base - (pos & 7)).astype(np.uint32)) & mask]
            out[step, :active] = e >> 5
            pos += e & 31
    except IndexError:
        raise _Corrupt("Huffman bit stream runs past its end") from None
    if not np.array_equal(pos, ends[:len(pos)]):
        raise _Corrupt("Huffman blocks do not end where recorded")
    if rem and nblocks > 1:
        return np.concatenate([out[:, :full].T.ravel(), out[:rem, full]])
    if nblocks == 1:
        return out[:n, 0].copy()
    return out.T.ravel()


def huffman_decode(blob: bytes) -> np.ndarray:
    """The symbols of a :func:`huffman_encode` blob (uint8 for alphabets <= 256, else uint16)."""
    r = _Reader(blob)
    try:
        out = _huffman_read(r)
    except _Corrupt as e:
        raise PackError(f"Huffman blob: {e}") from None
    if r.p != len(blob):
        raise PackError(f"Huffman blob: {len(blob) - r.p} trailing bytes")
    return out


# ================================================================================ codings
def _uview(payload: bytes, isz: int) -> np.ndarray:
    return np.frombuffer(payload, dtype=f"<u{isz}")


def _enc_raw(payload: bytes) -> tuple[int, bytes]:
    lz = _lzma(payload)
    return (_LZMA, lz) if len(lz) < len(payload) else (_STORED, payload)


def _enc_palette(u: np.ndarray) -> bytes | None:
    if len(u) > 4096 and len(np.unique(u[:4096])) > 256:
        return None
    vals, inv = np.unique(u, return_inverse=True)
    if len(vals) > 256:
        return None
    w = _Writer()
    w.var(len(vals))
    w.raw(vals.astype(u.dtype).tobytes())
    w.raw(huffman_encode(inv.astype(np.uint8), len(vals)))
    return w.getvalue()


def _section(coding: int, isz: int, nbytes: int, body: bytes) -> bytes:
    w = _Writer()
    w.u8(coding)
    w.u8(isz)
    w.var(nbytes)
    w.raw(body)
    return w.getvalue()


def _encode_dense(payload: bytes, isz: int) -> bytes:
    cands: list[bytes] = []
    c, body = _enc_raw(payload)
    cands.append(_section(c, isz, len(payload), body))
    if len(payload) and isz > 1:
        planes = np.frombuffer(payload, dtype=np.uint8).reshape(-1, isz).T.tobytes()
        cands.append(_section(_BYTESPLIT, isz, len(payload), _lzma(planes)))
    if len(payload) and isz == 1:
        cands.append(_section(_HUFFBYTES, isz, len(payload),
                              huffman_encode(np.frombuffer(payload, dtype=np.uint8), 256)))
    if len(payload) and isz > 1:
        pal = _enc_palette(_uview(payload, isz))
        if pal is not None:
            cands.append(_section(_PALETTE, isz, len(payload), pal))
    return min(cands, key=len)  # min keeps the first of equal sizes: deterministic


def _gap_symbols(gaps: np.ndarray, b: int) -> np.ndarray:
    esc = (1 << b) - 1
    q, r = np.divmod(gaps, esc)
    ends = np.cumsum(q + 1) - 1
    sym = np.full(int(ends[-1]) + 1 if len(ends) else 0, esc, dtype=np.uint16)
    sym[ends] = r
    return sym


def _fill_value(u: np.ndarray) -> int | None:
    """The background value of the sparse coding: 0 when >= 30 % of the elements are bit-pattern
    zero (pruned weights), else the most frequent bit pattern if it is that common (the index of
    the zero centroid in clustered codes), else None."""
    n = len(u)
    if n == 0:
        return None
    if n - np.count_nonzero(u) >= SPARSE_MIN_ZEROS * n:
        return 0
    if u.dtype.itemsize == 1:
        counts = np.bincount(u, minlength=256)
        mode = int(np.argmax(counts))
        return mode if counts[mode] >= SPARSE_MIN_ZEROS * n else None
    sample = u[::max(1, n // 65536)]
    vals, counts = np.unique(sample, return_counts=True)
    mode = vals[np.argmax(counts)]
    return int(mode) if np.count_nonzero(u == mode) >= SPARSE_MIN_ZEROS * n else None


def _encode_sparse(payload: bytes, isz: int) -> bytes | None:
    u = _uview(payload, isz)
    fill = _fill_value(u)
    if fill is None:
        return None
    nz = np.flatnonzero(u != fill) if fill else np.flatnonzero(u)
    gaps = np.diff(nz, prepend=-1) - 1
    best_b, best_size = 1, None
    for b in range(1, 13):
        sym = _gap_symbols(gaps, b)
        counts = np.bincount(sym, minlength=1 << b)
        _, size = _huffman_layout(counts, 1 << b)
        if best_size is None or size < best_size:
            best_b, best_size = b, size
    w = _Writer()
    w.u8(best_b)
    w.raw(np.array([fill], dtype=u.dtype).tobytes())
    w.var(len(nz))
    w.raw(huffman_encode(_gap_symbols(gaps, best_b), 1 << best_b))
    w.raw(_encode_dense(u[nz].tobytes(), isz))
    return _section(_SPARSE, isz, len(payload), w.getvalue())


def _encode_tensor(payload: bytes, isz: int) -> bytes:
    cands = [_encode_dense(payload, isz)]
    sp = _encode_sparse(payload, isz)
    if sp is not None:
        cands.append(sp)
    return min(cands, key=len)


def _decode_section(r: _Reader, depth: int = 0) -> bytes:
    coding, isz, nbytes = r.u8(), r.u8(), r.var()
    if isz not in (1, 2, 4, 8) or nbytes % isz:
        raise _Corrupt(f"bad element size {isz} for {nbytes} bytes")
    n = nbytes // isz
    if coding == _STORED:
        return r.take(nbytes)
    if coding == _LZMA:
        return _unlzma(r.take(r.end - r.p), nbytes)
    if coding == _BYTESPLIT:
        planes = _unlzma(r.take(r.end - r.p), nbytes)
        return np.frombuffer(planes, dtype=np.uint8).reshape(isz, n).T.tobytes()
    if coding == _HUFFBYTES:
        sym = _huffman_read(r)
        if len(sym) != nbytes or sym.dtype != np.uint8:
            raise _Corrupt("huffman-bytes symbol count does not match")
        return sym.tobytes()
    if coding == _PALETTE:
        k = r.var()
        vals = np.frombuffer(r.take(k * isz), dtype=f"<u{isz}")
        idx = _huffman_read(r)
        if len(idx) != n or (len(idx) and int(idx.max()) >= k):
            raise _Corrupt("palette indices do not match the table")
        return vals[idx].tobytes()
    if coding == _SPARSE and depth == 0:
        b = r.u8()
        fill = np.frombuffer(r.take(isz), dtype=f"<u{isz}")
        nnz = r.var()
        if not 1 <= b <= 12 or nnz > n:
            raise _Corrupt("bad sparse header")
        sym = _huffman_read(r).astype(np.int64)
        esc = (1 << b) - 1
        is_val = sym != esc
        adv = np.where(is_val, sym + 1, esc)
        positions = np.cumsum(adv)[is_val] - 1
        vals = _decode_section(r, depth + 1)
        if len(positions) != nnz or len(vals) != nnz * isz or (nnz and positions[-1] >= n):
            raise _Corrupt("sparse positions / values do not match")
        out = np.full(n, fill[0], dtype=f"<u{isz}")
        out[positions] = np.frombuffer(vals, dtype=f"<u{isz}")
        return out.tobytes()
    raise _Corrupt(f"unknown section coding {coding}")


def _section_coding(section: bytes) -> tuple[str, str]:
    """Name and a short description of a section's coding (for the stats)."""
    c = section[0]
    name = _CODING_NAME.get(c, "?")
    if c == _STORED:
        return name, "stored"
    if c == _LZMA:
        return name, "lzma"
    if c == _SPARSE:
        r = _Reader(section)
        _, isz, _ = r.u8(), r.u8(), r.var()
        b = r.u8()
        fill = int(np.frombuffer(r.take(isz), dtype=f"<u{isz}")[0])
        nnz = r.var()
        _huffman_read(r)
        inner = _CODING_NAME.get(section[r.p], "?")
        inner = {_STORED: "stored", _LZMA: "lzma"}.get(section[r.p], inner)
        bg = f"{nnz} non-zeros" if fill == 0 else f"{nnz} differ from background 0x{fill:0{2 * isz}x}"
        return name, f"b={b}, {bg}, values {inner}"
    if c == _PALETTE:
        r = _Reader(section)
        r.u8(), r.u8(), r.var()
        return name, f"{r.var()} values"
    return name, ""


# ============================================================================ ONNX plumbing
def _walk_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every TensorProto of the model, in a fixed order (the same for a stripped copy)."""
    out: list[onnx.TensorProto] = []

    def graph(g: onnx.GraphProto) -> None:
        out.extend(g.initializer)
        for st in g.sparse_initializer:
            out.extend((st.values, st.indices))
        for n in g.node:
            node(n)

    def node(n: onnx.NodeProto) -> None:
        for a in n.attribute:
            if a.HasField("t"):
                out.append(a.t)
            out.extend(a.tensors)
            if a.HasField("sparse_tensor"):
                out.extend((a.sparse_tensor.values, a.sparse_tensor.indices))
            for st in a.sparse_tensors:
                out.extend((st.values, st.indices))
            if a.HasField("g"):
                graph(a.g)
            for sg in a.graphs:
                graph(sg)

    graph(model.graph)
    for ti in model.training_info:
        if ti.HasField("initialization"):
            graph(ti.initialization)
        if ti.HasField("algorithm"):
            graph(ti.algorithm)
    for f in model.functions:
        for n in f.node:
            node(n)
    return out


def _elements(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def _dtype_name(t: onnx.TensorProto) -> str:
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)))
    except Exception:
        pass
    try:
        return onnx.TensorProto.DataType.Name(t.data_type).lower()
    except ValueError:
        return str(t.data_type)


def _itemsize(t: onnx.TensorProto, nbytes: int) -> int:
    """Element size used by the codings: the dtype's (a complex number counts as two floats),
    1 where the payload is not elements x itemsize (4-bit types, odd dtypes)."""
    try:
        isz = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        return 1
    if nbytes != _elements(t) * isz:
        return 1
    if t.data_type in (_T.COMPLEX64, _T.COMPLEX128):
        isz //= 2
    return isz if isz in (1, 2, 4, 8) else 1


def _take_payload(t: onnx.TensorProto) -> tuple[int, bytes, int] | None:
    """(field code, payload bytes, element size) of a big enough tensor, its payload cleared."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        raise _NoTensorMode(f"tensor '{t.name}' uses external data (the .onnx file is packed alone, "
                            "without its data files)")
    if t.HasField("raw_data"):
        if len(t.raw_data) < MIN_TENSOR_BYTES:
            return None
        payload = t.raw_data
        t.ClearField("raw_data")
        return 0, payload, _itemsize(t, len(payload))
    typed = [(name, getattr(t, name)) for name in ("float_data", "double_data", "int64_data", "uint64_data",
                                                    "int32_data") if len(getattr(t, name))]
    if len(typed) != 1:
        return None
    name, vals = typed[0]
    code = {"float_data": 1, "double_data": 2, "int64_data": 3, "uint64_data": 4, "int32_data": 5}[name]
    arr = np.array(vals, dtype=_FIELDS[code][1])
    if code == 5 and t.data_type in _INT32_NARROW:
        narrow = _INT32_NARROW[t.data_type]
        small = arr.astype(_FIELDS[narrow][1])
        if np.array_equal(small.astype(np.int32), arr):
            code, arr = narrow, small
    payload = arr.tobytes()
    if len(payload) < MIN_TENSOR_BYTES:
        return None
    t.ClearField(name)
    return code, payload, arr.dtype.itemsize


def _put_payload(t: onnx.TensorProto, code: int, payload: bytes) -> None:
    if code not in _FIELDS:
        raise _Corrupt(f"unknown tensor field code {code}")
    name, dt = _FIELDS[code]
    if dt is None:
        t.raw_data = payload
        return
    if len(payload) % np.dtype(dt).itemsize:
        raise _Corrupt("typed payload length is not a multiple of its element size")
    arr = np.frombuffer(payload, dtype=dt)
    if name == "int32_data":
        arr = arr.astype(np.int32)
    getattr(t, name).extend(arr.tolist())


def _read_input(src: str | os.PathLike | bytes | bytearray | memoryview, err: type[NNSculptError],
                what: str) -> tuple[bytes, str]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), "<bytes>"
    p = Path(src)
    if not p.exists():
        raise err(f"{p}: no such file")
    if p.is_dir():
        raise err(f"{p}: is a directory, expected {what}")
    return p.read_bytes(), str(p)


def _parse_onnx(data: bytes, name: str) -> onnx.ModelProto:
    """ModelProto of ``data``; ModelLoadError (naming the file) if it is not ONNX."""
    from ..ir.onnx_io import parse_model_bytes

    if data[:4] == MAGIC:
        raise ModelLoadError(f"{name}: already an nnsculpt container (use 'nnsculpt unpack')")
    return parse_model_bytes(data, name)


# ============================================================================= statistics
@dataclass
class TensorStats:
    """One packed tensor: payload size before, section size after, chosen coding."""
    name: str
    dtype: str
    elements: int
    coding: str
    bytes_before: int
    bytes_after: int
    bits_per_element: float
    detail: str = ""


@dataclass
class PackStats:
    """What :func:`pack` did, with general-purpose compressors on the same file to compare."""
    source: str
    original_bytes: int
    packed_bytes: int
    ratio: float  #: original / packed
    mode: str  #: "tensors" (per-tensor coding) or "raw" (xz of the whole file)
    reason: str  #: why mode is "raw" ("" for "tensors")
    model_bytes: int  #: LZMA'd ModelProto without the packed payloads (mode "tensors")
    lzma_bytes: int  #: xz -9e of the whole original file
    zlib_bytes: int  #: zlib level 9 of the whole original file
    zstd_bytes: int | None  #: zstd level 19 (None if the zstandard module is not installed)
    tensors: list[TensorStats] = field(default_factory=list)

    @property
    def vs_lzma(self) -> float:
        """lzma bytes / packed bytes (> 1: the container is smaller than xz -9e of the file)."""
        return self.lzma_bytes / max(1, self.packed_bytes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vs_lzma"] = round(self.vs_lzma, 4)
        d["ratio"] = round(self.ratio, 4)
        for t in d["tensors"]:
            t["bits_per_element"] = round(t["bits_per_element"], 3)
        return d


def _baselines(data: bytes) -> tuple[bytes, int, int | None]:
    xz = lzma.compress(data, format=lzma.FORMAT_XZ, preset=_LZMA_PRESET)
    zl = len(zlib.compress(data, 9))
    try:
        import zstandard  # optional, for the comparison only
    except ImportError:
        zs = None
    else:
        zs = len(zstandard.ZstdCompressor(level=19).compress(data))
    return xz, zl, zs


# =========================================================================== container I/O
def _container(header: dict[str, Any], body: bytes, original: bytes) -> bytes:
    hdr = _lzma(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())
    head = _PREFIX.pack(MAGIC, VERSION, len(hdr), len(body)) + hdr + body + hashlib.sha256(original).digest()
    return head + hashlib.sha256(head).digest()


def _open(data: bytes, name: str) -> tuple[dict[str, Any], memoryview, bytes]:
    """Check magic, size and checksum; return (header, body, SHA-256 of the original)."""
    if len(data) < 4 or data[:4] != MAGIC:
        hint = "; it looks like an ONNX file" if data[:1] == b"\x08" else ""
        raise PackError(f"{name}: not an nnsculpt container (no {MAGIC!r} magic bytes{hint})")
    if len(data) < _PREFIX.size + _TRAILER:
        raise PackError(f"{name}: truncated: expected at least {_PREFIX.size + _TRAILER} bytes, got {len(data)}")
    _, version, hlen, blen = _PREFIX.unpack_from(data)
    expect = _PREFIX.size + hlen + blen + _TRAILER
    if len(data) < expect:
        raise PackError(f"{name}: truncated: expected {expect} bytes, got {len(data)}")
    if len(data) > expect:
        raise PackError(f"{name}: size mismatch: expected {expect} bytes, got {len(data)} (trailing data or a "
                        "damaged size field)")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise PackError(f"{name}: checksum mismatch: the container is corrupted (SHA-256 of its contents differs)")
    if version != VERSION:
        raise PackError(f"{name}: unsupported container version {version} (this nnsculpt reads {VERSION})")
    mv = memoryview(data)
    try:
        header = json.loads(_unlzma(bytes(mv[_PREFIX.size:_PREFIX.size + hlen])))
    except (_Corrupt, ValueError) as e:
        raise PackError(f"{name}: corrupt container header: {e}") from None
    return header, mv[_PREFIX.size + hlen:_PREFIX.size + hlen + blen], bytes(data[-64:-32])


def _decode_body(header: dict[str, Any], body: memoryview) -> bytes:
    mode = header.get("mode")
    if mode == "raw":
        try:
            out = lzma.decompress(bytes(body), format=lzma.FORMAT_XZ)
        except lzma.LZMAError as e:
            raise _Corrupt(f"xz stream: {e}") from None
        return out
    if mode != "tensors":
        raise _Corrupt(f"unknown mode {mode!r}")
    msize = int(header["model"])
    model = onnx.ModelProto()
    model.ParseFromString(_unlzma(bytes(body[:msize])))
    tensors = _walk_tensors(model)
    pos = msize
    for idx, code, size in header["tensors"]:
        if not 0 <= idx < len(tensors) or size < 2:
            raise _Corrupt(f"tensor entry {idx} out of range")
        r = _Reader(body, pos, pos + size)
        payload = _decode_section(r)
        if r.p != r.end:
            raise _Corrupt(f"section of tensor #{idx} has {r.end - r.p} unread bytes")
        _put_payload(tensors[idx], code, payload)
        pos += size
    if pos != len(body):
        raise _Corrupt(f"{len(body) - pos} unread bytes after the last section")
    return model.SerializeToString()


def unpack(data: bytes | bytearray | memoryview, *, name: str = "<bytes>") -> bytes:
    """The original ONNX bytes of a container made by :func:`pack` (PackError if damaged)."""
    data = bytes(data)
    header, body, sha = _open(data, name)
    try:
        out = _decode_body(header, body)
    except PackError:
        raise
    except Exception as e:  # _Corrupt, protobuf DecodeError, bad header values...
        raise PackError(f"{name}: corrupt container: {e}") from None
    if hashlib.sha256(out).digest() != sha:
        raise PackError(f"{name}: checksum mismatch: the unpacked model's SHA-256 differs from the recorded one")
    if len(out) != header.get("size"):
        raise PackError(f"{name}: size mismatch: unpacked {len(out)} bytes, recorded {header.get('size')}")
    return out


def _pack_tensors(data: bytes, model: onnx.ModelProto) -> tuple[bytes, list[TensorStats], int]:
    entries: list[list[int]] = []
    sections: list[bytes] = []
    rows: list[TensorStats] = []
    for idx, t in enumerate(_walk_tensors(model)):
        took = _take_payload(t)
        if took is None:
            continue
        code, payload, isz = took
        sec = _encode_tensor(payload, isz)
        entries.append([idx, code, len(sec)])
        sections.append(sec)
        coding, detail = _section_coding(sec)
        n = _elements(t) or 1
        rows.append(TensorStats(t.name or f"#{idx}", _dtype_name(t), _elements(t), coding, len(payload),
                                len(sec), 8.0 * len(sec) / n, detail))
    stripped = _lzma(model.SerializeToString())
    header = {"mode": "tensors", "size": len(data), "model": len(stripped), "tensors": entries}
    return _container(header, stripped + b"".join(sections), data), rows, len(stripped)


def pack(model: str | os.PathLike | bytes | bytearray | memoryview, *, name: str | None = None
         ) -> tuple[bytes, PackStats]:
    """Pack an ONNX file (path or bytes) into a container; returns (container bytes, stats).

    :func:`unpack` of the result gives the input byte for byte (checked here before returning)."""
    data, src = _read_input(model, ModelLoadError, "an .onnx file")
    src = name or src
    proto = _parse_onnx(data, src)
    xz, zl, zs = _baselines(data)
    raw = _container({"mode": "raw", "size": len(data), "raw": len(xz)}, xz, data)
    best, rows, model_bytes, mode, reason = raw, [], 0, "raw", ""
    try:
        packed, rows_t, mb = _pack_tensors(data, proto)
        try:
            ok = unpack(packed, name=src) == data
        except PackError:
            ok = False
        if not ok:
            raise _NoTensorMode("re-serializing the parsed protobuf does not give the same bytes "
                                "(written by another protobuf writer, unknown fields or typed fields)")
        if len(packed) < len(raw):
            best, rows, model_bytes, mode = packed, rows_t, mb, "tensors"
        else:
            reason = f"per-tensor coding ({len(packed):,} bytes) is not smaller than xz of the whole file"
    except _NoTensorMode as e:
        reason = str(e)
        log.warning("%s: packed as one xz stream: %s", src, reason)
    stats = PackStats(source=src, original_bytes=len(data), packed_bytes=len(best),
                      ratio=len(data) / len(best), mode=mode, reason=reason, model_bytes=model_bytes,
                      lzma_bytes=len(xz), zlib_bytes=zl, zstd_bytes=zs, tensors=rows)
    return best, stats


def pack_file(src: str | os.PathLike, dst: str | os.PathLike) -> PackStats:
    """Pack ``src`` (.onnx) into ``dst`` (written atomically; nothing written on error)."""
    data, stats = pack(src)
    write_bytes_atomic(Path(dst), data)
    return stats


def unpack_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Unpack container ``src`` into the ONNX file ``dst`` (atomic; nothing written on error)."""
    data, name = _read_input(src, PackError, "an nnsculpt container")
    return write_bytes_atomic(Path(dst), unpack(data, name=name))


# ============================================================================ command line
def _fmt_summary(st: PackStats, out: str, top: int = 10) -> str:
    def line(label: str, n: int | None, note: str = "") -> str:
        if n is None:
            return f"{label:<13} {'-':>12}        (not installed)"
        return f"{label:<13} {n:>12,} bytes  {st.original_bytes / max(1, n):6.2f}x{note}"

    gain = 100.0 * (1 - st.packed_bytes / max(1, st.lzma_bytes))
    lines = [f"packed        {st.source} -> {out}  (mode {st.mode}{': ' + st.reason if st.reason else ''})",
             line("original", st.original_bytes),
             line("nnsculpt", st.packed_bytes, f"  ({gain:+.1f}% vs lzma: {st.vs_lzma:.3f}x smaller)"
                  if gain >= 0 else f"  ({-gain:.1f}% larger than lzma)"),
             line("lzma -9e", st.lzma_bytes), line("zlib -9", st.zlib_bytes), line("zstd -19", st.zstd_bytes)]
    if st.tensors:
        if st.mode == "tensors":
            lines.append(f"{'ModelProto':<13} {st.model_bytes:>12,} bytes  (graph + small tensors, lzma)")
        rows = sorted(st.tensors, key=lambda t: (-t.bytes_before, t.name))[:top]
        w = max(6, min(40, max(len(t.name) for t in rows)))
        lines.append("")
        lines.append(f"{'tensor':<{w}}  {'dtype':<8} {'elements':>10}  {'coding':<13} {'before':>10} "
                     f"{'after':>10}  bits/elem")
        for t in rows:
            nm = t.name if len(t.name) <= w else "…" + t.name[-(w - 1):]
            lines.append(f"{nm:<{w}}  {t.dtype:<8} {t.elements:>10,}  {t.coding:<13} {t.bytes_before:>10,} "
                         f"{t.bytes_after:>10,}  {t.bits_per_element:8.2f}" + (f"  {t.detail}" if t.detail else ""))
        if len(st.tensors) > top:
            lines.append(f"... {len(st.tensors) - top} more tensors (--json lists all)")
    return "\n".join(lines)


def cmd_pack(args: argparse.Namespace) -> int:
    stats = pack_file(args.model, args.output)
    if args.json:
        print(json.dumps(stats.to_dict(), indent=1))
    else:
        print(_fmt_summary(stats, args.output))
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    out = unpack_file(args.container, args.output)
    print(f"wrote     {out} ({out.stat().st_size:,} bytes, SHA-256 verified)")
    return 0


def add_cli(subparsers) -> None:
    """Add the ``pack`` and ``unpack`` subcommands (handlers as ``func``) to an argparse subparsers."""
    s = subparsers.add_parser("pack", help="lossless compressed container (.nnz) of an ONNX file: Huffman / "
                              "palette / sparse coding of the weights",
                              description="Pack an ONNX file into a lossless .nnz container (Deep Compression's "
                                          "Huffman + relative-index storage); 'nnsculpt unpack' restores it "
                                          "byte for byte.")
    s.add_argument("model", help=".onnx path")
    s.add_argument("-o", "--output", required=True, help="output container path (.nnz)")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")
    s.set_defaults(func=cmd_pack)
    s = subparsers.add_parser("unpack", help="restore the ONNX file of a .nnz container (byte-identical)")
    s.add_argument("container", help=".nnz path written by 'nnsculpt pack'")
    s.add_argument("-o", "--output", required=True, help="output .onnx path")
    s.set_defaults(func=cmd_unpack)
