"""``nnsculpt pack`` / ``unpack``: lossless ONNX container with Huffman / palette / sparse coding."""

from __future__ import annotations

import lzma
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnsculpt.cli import main
from nnsculpt.ir.errors import ModelLoadError, PackError
from nnsculpt.runtime.pack import (
    MAX_CODE_LEN, canonical_codes, huffman_code_lengths, huffman_decode, huffman_encode, pack, pack_file, unpack,
    unpack_file,
)

N = 256  # weights are N x N


def _xz(data: bytes) -> int:
    return len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def _matmul_model(w_nodes, inits, w_name="W") -> bytes:
    """Y = X @ W, W an initializer or computed by ``w_nodes``; returns the serialized model."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, N])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])
    g = helper.make_graph([*w_nodes, helper.make_node("MatMul", ["X", w_name], ["Y"])], "g", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="test_pack")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def _geometric(rng, k: int, n: int, q: float = 0.7) -> np.ndarray:
    p = q ** np.arange(k)
    return rng.choice(k, size=n, p=p / p.sum())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> ONNX bytes of the synthetic test models."""
    rng = np.random.default_rng(0)
    out = {}
    # clustered weight stored as uint8 indices into a 16-entry float codebook (Gather + Cast)
    idx = _geometric(rng, 16, N * N).astype(np.uint8).reshape(N, N)
    book = np.sort(rng.normal(0, 0.1, 16)).astype(np.float32)
    out["uint8"] = _matmul_model(
        [helper.make_node("Cast", ["idx"], ["idx64"], to=TensorProto.INT64),
         helper.make_node("Gather", ["book", "idx64"], ["Wg"], axis=0)],
        [numpy_helper.from_array(idx, "idx"), numpy_helper.from_array(book, "book")], "Wg")
    # pruned weight: 60 % exact zeros, gaussian non-zeros
    w = rng.normal(0, 0.05, (N, N)).astype(np.float32)
    w[rng.random((N, N)) < 0.6] = 0.0
    out["sparse"] = _matmul_model([], [numpy_helper.from_array(w, "W")])
    # clustered weight stored as float32: 16 distinct values (one of them -0.0)
    levels = np.concatenate([[-0.0], np.linspace(-0.3, 0.3, 15)]).astype(np.float32)
    wp = levels[_geometric(rng, 16, N * N, 0.75)].reshape(N, N)
    out["palette"] = _matmul_model([], [numpy_helper.from_array(wp, "W")])
    # typed fields (float_data, int32_data for uint8) instead of raw_data
    vals = rng.normal(0, 1, N * N).astype(np.float32)
    t = helper.make_tensor("W", TensorProto.FLOAT, [N, N], vals.tolist())
    ti = helper.make_tensor("u", TensorProto.UINT8, [4096], _geometric(rng, 8, 4096).tolist())
    out["typed"] = _matmul_model([], [t, ti])
    return out


@pytest.fixture(scope="module")
def zoo_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "digits_resnet.onnx"
    assert main(["compile", "zoo:digits_resnet", "-p", "dce", "-o", str(path)]) == 0
    return path


# ------------------------------------------------------------------------------- Huffman
@pytest.mark.parametrize("alphabet,q", [(2, 0.2), (16, 0.7), (256, 0.97), (4096, 0.999), (5, 1.0)])
def test_huffman_round_trip_and_near_entropy(alphabet, q):
    rng = np.random.default_rng(alphabet)
    n = 50_000
    x = _geometric(rng, alphabet, n, q)
    blob = huffman_encode(x, alphabet)
    assert np.array_equal(huffman_decode(blob), x)
    counts = np.bincount(x, minlength=alphabet)
    lengths = huffman_code_lengths(counts)
    p = counts[counts > 0] / n
    entropy = float(-(p * np.log2(p)).sum())
    avg = float((counts * lengths).sum() / n)
    assert entropy - 1e-9 <= avg < entropy + 1
    assert len(blob) * 8 / n < entropy + 1 + 0.1  # the table and block index are small


def test_huffman_canonical_prefix_free_and_length_limit():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])  # a plain Huffman tree would be 29 deep
    lengths = huffman_code_lengths(np.array(fib))
    assert lengths.max() <= MAX_CODE_LEN
    assert sum(2.0 ** -int(n) for n in lengths) == pytest.approx(1.0)  # complete code
    codes = canonical_codes(lengths)
    words = sorted(format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths))
    assert all(not b.startswith(a) for a, b in zip(words, words[1:]))
    x = np.repeat(np.arange(30), fib)[::-1]
    assert np.array_equal(huffman_decode(huffman_encode(x, 30)), x)


def test_huffman_degenerate_inputs():
    one = np.full(100_000, 7)
    blob = huffman_encode(one, 256)
    assert len(blob) < 16  # no bit stream for a single symbol
    assert np.array_equal(huffman_decode(blob), one)
    for x in (np.array([3]), np.array([], dtype=np.int64), np.array([0, 1] * 1025)):
        assert np.array_equal(huffman_decode(huffman_encode(x, 4)), x)


def test_huffman_decode_speed():
    x = _geometric(np.random.default_rng(1), 256, 1_000_000, 0.9)
    blob = huffman_encode(x, 256)
    t0 = time.perf_counter()
    y = huffman_decode(blob)
    assert time.perf_counter() - t0 < 2.0
    assert np.array_equal(y, x)


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name,coding,tensor", [("uint8", "huffman-bytes", "idx"), ("sparse", "sparse", "W"),
                                                ("palette", "palette", "W")])
def test_codings_chosen_and_beat_lzma(models, name, coding, tensor):
    data = models[name]
    packed, st = pack(data)
    assert unpack(packed) == data
    assert st.mode == "tensors", st.reason
    rows = {r.name: r for r in st.tensors}
    assert rows[tensor].coding == coding
    assert st.packed_bytes == len(packed) < st.lzma_bytes == _xz(data)
    assert st.zlib_bytes > 0 and st.ratio == pytest.approx(len(data) / len(packed))


def test_typed_fields_round_trip(models):
    data = models["typed"]
    packed, st = pack(data)
    assert unpack(packed) == data
    assert st.mode == "tensors"
    assert {r.name for r in st.tensors} == {"W", "u"}


def test_background_value_sparse_and_other_tensor_kinds():
    """Codes of a pruned + clustered weight (85 % the zero centroid's index 8, not 0) get the
    sparse coding around that background value; Constant attributes, float16 and int64 tensors,
    and a sparse_initializer round-trip too."""
    rng = np.random.default_rng(5)
    codes = np.where(rng.random(N * N) < 0.85, 8, rng.integers(0, 16, N * N)).astype(np.uint8)
    half = rng.normal(0, 1, 4096).astype(np.float16)
    const = helper.make_node("Constant", [], ["C"], value=numpy_helper.from_array(
        rng.normal(0, 1, 1000).astype(np.float32), "c"))
    sp = helper.make_sparse_tensor(numpy_helper.from_array(rng.normal(0, 1, 500).astype(np.float32), "S"),
                                   numpy_helper.from_array(np.arange(0, 5000, 10, dtype=np.int64), "S_i"), [5000])
    inits = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(half, "half"),
             numpy_helper.from_array(np.arange(1000, dtype=np.int64), "ints")]
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in
            [("C", TensorProto.FLOAT), ("codes_o", TensorProto.UINT8), ("half_o", TensorProto.FLOAT16)]]
    g = helper.make_graph([const, helper.make_node("Identity", ["codes"], ["codes_o"]),
                           helper.make_node("Identity", ["half"], ["half_o"])], "g", [], outs, inits,
                          sparse_initializer=[sp])
    data = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    packed, st = pack(data)
    assert unpack(packed) == data
    rows = {r.name: r for r in st.tensors}
    assert st.mode == "tensors" and {"codes", "half", "ints", "c", "S", "S_i"} <= set(rows)
    assert rows["codes"].coding == "sparse" and "background 0x08" in rows["codes"].detail
    assert rows["codes"].bits_per_element < 1.2
    assert rows["ints"].bytes_after < 8000 / 10  # arange: LZMA sees the pattern


def test_zoo_model_round_trip(zoo_onnx):
    data = zoo_onnx.read_bytes()
    packed, st = pack(zoo_onnx)
    assert unpack(packed) == data
    assert st.mode == "tensors" and len(st.tensors) >= 10
    assert len(packed) < st.lzma_bytes  # float32 weights: byte planes beat xz of the whole file
    assert pack(data)[0] == packed  # deterministic (and path / bytes input agree)


def test_non_canonical_protobuf_falls_back_to_raw(models):
    tail = onnx.ModelProto(doc_string="appended after the graph field").SerializeToString()
    data = models["sparse"] + tail  # parses (protobuf merges) but re-serializes in another order
    packed, st = pack(data)
    assert st.mode == "raw" and "re-serializ" in st.reason
    assert unpack(packed) == data


def test_external_data_packed_raw(tmp_path):
    m = onnx.load_from_string(_matmul_model([], [numpy_helper.from_array(np.ones((N, N), np.float32), "W")]))
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.bin", size_threshold=0)
    data = (tmp_path / "ext.onnx").read_bytes()
    packed, st = pack(tmp_path / "ext.onnx")
    assert st.mode == "raw" and "external data" in st.reason
    assert unpack(packed) == data


def test_determinism(models):
    for data in models.values():
        assert pack(data)[0] == pack(bytes(data))[0]


# ---------------------------------------------------------------------------------- errors
def test_pack_refuses_non_onnx(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_bytes(b"this is not a protobuf \xff\xff\xff")
    with pytest.raises(ModelLoadError, match="notes.onnx"):
        pack_file(bad, tmp_path / "x.nnz")
    assert main(["pack", str(bad), "-o", str(tmp_path / "x.nnz")]) == 2
    assert capsys.readouterr().err.startswith("nnsculpt: error: ModelLoadError:")
    assert not (tmp_path / "x.nnz").exists()


def _corruptions(good: bytes) -> dict[str, tuple[bytes, str]]:
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    rng = np.random.default_rng(0)
    return {"random": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an nnsculpt container"),
            "truncated": (good[:len(good) - 100],
                          f"truncated: expected {len(good)} bytes, got {len(good) - 100}"),
            "flipped": (bytes(flipped), "checksum mismatch")}


@pytest.mark.parametrize("case", ["random", "truncated", "flipped"])
def test_unpack_damaged(models, tmp_path, capsys, case):
    good, _ = pack(models["palette"])
    data, reason = _corruptions(good)[case]
    src, out = tmp_path / "m.nnz", tmp_path / "out.onnx"
    src.write_bytes(data)
    with pytest.raises(PackError, match=reason) as ei:
        unpack_file(src, out)
    assert "m.nnz" in str(ei.value)
    assert not out.exists()
    assert main(["unpack", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnsculpt: error: PackError:") and reason in err
    assert not out.exists()


def test_any_flipped_byte_is_caught(models):
    good, _ = pack(models["uint8"])
    for pos in sorted(set(np.linspace(0, len(good) - 1, 97).astype(int).tolist()) | set(range(18))):
        bad = bytearray(good)
        bad[pos] ^= 0x40
        with pytest.raises(PackError):
            unpack(bytes(bad))
    with pytest.raises(PackError, match="truncated"):
        unpack(good[:10])
    with pytest.raises(PackError, match="not an nnsculpt container"):
        unpack(models["uint8"])


# ------------------------------------------------------------------------------------- CLI
def test_cli_round_trip_runs_in_ort(zoo_onnx, tmp_path, capsys):
    nnz, back = tmp_path / "m.nnz", tmp_path / "back.onnx"
    assert main(["pack", str(zoo_onnx), "-o", str(nnz)]) == 0
    out = capsys.readouterr().out
    assert "lzma -9e" in out and "bits/elem" in out and "bytesplit" in out
    assert main(["unpack", str(nnz), "-o", str(back)]) == 0
    assert back.read_bytes() == zoo_onnx.read_bytes()
    sess = ort.InferenceSession(str(back), providers=["CPUExecutionProvider"])
    i = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    (y,) = sess.run(None, {i.name: np.zeros(shape, np.float32)})
    assert np.isfinite(y).all()


def test_cli_json(models, tmp_path, capsys):
    import json

    src = tmp_path / "pal.onnx"
    src.write_bytes(models["palette"])
    assert main(["pack", str(src), "-o", str(tmp_path / "p.nnz"), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["mode"] == "tensors" and st["packed_bytes"] == (tmp_path / "p.nnz").stat().st_size
    assert st["vs_lzma"] > 1 and st["tensors"][0]["coding"] == "palette"
    assert set(st["tensors"][0]) >= {"name", "dtype", "elements", "coding", "bytes_before", "bytes_after",
                                     "bits_per_element"}
