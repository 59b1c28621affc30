"""Compressed updates (provider_runtime.compression): exact encodings, error feedback, and refusals by name."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from provider_runtime import compression
from provider_runtime.compression import (
    DELTA_KEY,
    EXACT_BELOW,
    MIN_SAVING,
    SCALE_SUFFIX,
    SCHEME_KEY,
    SEGMENT,
    CompressionError,
    Restored,
    _shuffled,
    _worth_coding,
    decode,
    encode,
    is_packed,
    pack,
    unpack,
)

BIG = (4, 64)  # 256 elements: compressed


def _base() -> dict[str, np.ndarray]:
    return {
        "w": np.zeros(BIG, np.float32),
        "b": np.zeros(16, np.float32),
        "count": np.array(7, np.int64),
    }


def test_fp16_sends_the_delta_rounded_to_half_and_small_and_integer_tensors_exactly() -> None:
    base = _base()
    base["w"][:] = 1.0
    trained = {"w": base["w"] + np.float32(0.1), "b": np.full(16, 0.123456789, np.float32), "count": np.array(9)}

    encoded = encode(trained, base, "fp16")

    assert encoded.arrays["w"].dtype == np.float16
    assert encoded.arrays["w"][0, 0] == np.float16(0.0999755859375)
    np.testing.assert_array_equal(encoded.arrays["b"], trained["b"])
    assert encoded.arrays["count"] == 9 and encoded.arrays["count"].dtype == np.int64
    assert encoded.metadata == {SCHEME_KEY: "fp16", DELTA_KEY: json.dumps(["w"])}
    full = decode(encoded.arrays, encoded.metadata, base)
    assert full["w"].dtype == np.float32
    assert full["w"][0, 0] == np.float32(1.0) + np.float32(0.0999755859375)
    # What rounding dropped from the fp32 delta is the residual, exactly
    delta = trained["w"][0, 0] - np.float32(1.0)
    assert encoded.residual["w"][0, 0] == delta - np.float32(np.float16(delta))


def test_bf16_rounds_to_nearest_even_on_the_dropped_bits() -> None:
    base = _base()
    trained = dict(base)
    w = np.zeros(BIG, np.float32)
    # 1 + 2^-8 is exactly halfway between two bf16 values (1 and 1 + 2^-7): ties go to the even one, 1.0;
    # 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to the even one, 1 + 2^-6.
    w[0, :3] = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-12]
    trained["w"] = w

    encoded = encode(trained, base, "bf16")

    assert encoded.arrays["w"].dtype == np.uint16
    restored = decode(encoded.arrays, encoded.metadata, base)["w"][0, :3]
    assert restored.tolist() == [1.0, 1 + 2**-6, 1 + 2**-7]


def test_int8_scales_each_output_channel_of_a_kernel_and_restores_exact_multiples() -> None:
    base = {"k": np.zeros((4, 2, 4, 8), np.float32)}
    k = np.zeros((4, 2, 4, 8), np.float32)
    k[0, 0, 0, :3] = [1.27, -0.635, 0.0]  # channel 0: scale 0.01
    k[1, 0, 0, :2] = [-2.54, 0.5]  # channel 1: scale 0.02, 0.5 -> 25

    encoded = encode({"k": k}, base, "int8")

    scale = encoded.arrays["k" + SCALE_SUFFIX]
    assert scale.shape == (4,) and scale.dtype == np.float32
    np.testing.assert_allclose(scale[:2], [0.01, 0.02], rtol=1e-6)
    assert scale[2] == 1.0 and scale[3] == 1.0  # all-zero channels
    q = encoded.arrays["k"]
    assert q.dtype == np.int8
    assert q[0, 0, 0, :3].tolist() == [127, -64, 0]  # -0.635 / 0.01 = -63.5 -> round half to even: -64
    assert q[1, 0, 0, :2].tolist() == [-127, 25]
    full = decode(encoded.arrays, encoded.metadata, base)["k"]
    np.testing.assert_allclose(full[1, 0, 0, :2], [-2.54, 0.5], rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 100_000), (300_000,), (512, 64, 3, 3), (3, 70_000, 2, 1)])
def test_int8_codes_and_residuals_are_those_of_whole_tensor_arithmetic(shape: tuple[int, ...]) -> None:
    # Prepare: deltas larger than the quantiser's pass (per tensor, per channel, rows longer and shorter than it),
    # one channel all zero, and a residual carried in
    rng = np.random.default_rng(3)
    trained = (rng.standard_t(3, size=shape) * 0.01).astype(np.float32)
    trained[1] = 0.0
    residual = (rng.standard_normal(shape) * 1e-4).astype(np.float32)
    base = np.zeros(shape, np.float32)

    # Execute
    encoded = encode({"w": trained}, {"w": base}, "int8", {"w": residual.copy()})

    # Assert: the same bits as the formula applied to the whole tensor at once
    delta = trained - base + residual
    per_channel = len(shape) >= 3
    peak = np.abs(delta.reshape(shape[0], -1)).max(axis=1) if per_channel else np.abs(delta).max()
    scale = (np.asarray(peak, np.float32) / np.float32(127.0)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    wide = scale.reshape((-1,) + (1,) * (len(shape) - 1)) if per_channel else scale
    codes = np.clip(np.rint(delta / wide), -127, 127).astype(np.int8)
    assert np.array_equal(encoded.arrays["w" + SCALE_SUFFIX].reshape(-1), scale.reshape(-1))
    assert np.array_equal(encoded.arrays["w"], codes)
    left = delta - codes.astype(np.float32) * wide
    assert np.array_equal(encoded.residual["w"].view(np.uint32), left.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("shape", [(EXACT_BELOW,), (16, EXACT_BELOW // 16)])
def test_int8_on_a_vector_or_matrix_uses_one_scale_for_the_tensor(shape: tuple[int, ...]) -> None:
    base = {"v": np.zeros(shape, np.float32)}
    trained = {"v": np.linspace(-1, 2, EXACT_BELOW, dtype=np.float32).reshape(shape)}

    encoded = encode(trained, base, "int8")

    assert encoded.arrays["v" + SCALE_SUFFIX].shape == ()
    assert encoded.arrays["v"].max() == 127 and encoded.arrays["v"].min() == -64


@pytest.mark.parametrize("scheme", ["fp16", "bf16", "int8"])
def test_error_feedback_keeps_the_sum_of_restored_deltas_within_one_rounding_of_the_truth(scheme: str) -> None:
    # The same small delta every round: without feedback each round loses the same rounding error; with it the
    # sum of what the server restored plus the worker's residual equals the sum of the true deltas.
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=BIG).astype(np.float32)}
    step = (rng.normal(size=BIG) * 1e-3).astype(np.float32)
    residual = None
    restored_sum = np.zeros(BIG, np.float64)
    plain_sum = np.zeros(BIG, np.float64)
    rounds = 20
    for _ in range(rounds):
        encoded = encode({"w": base["w"] + step}, base, scheme, residual)
        restored_sum += decode(encoded.arrays, encoded.metadata, base)["w"].astype(np.float64) - base["w"]
        residual = encoded.residual
        plain = encode({"w": base["w"] + step}, base, scheme)
        plain_sum += decode(plain.arrays, plain.metadata, base)["w"].astype(np.float64) - base["w"]

    truth = rounds * step.astype(np.float64)
    assert residual is not None
    np.testing.assert_allclose(restored_sum + residual["w"], truth, atol=1e-5)
    feedback_error = np.abs(restored_sum - truth).max()
    plain_error = np.abs(plain_sum - truth).max()
    assert feedback_error < plain_error / 5


def test_decode_names_what_is_wrong() -> None:
    base = _base()
    trained = {**base, "w": np.ones(BIG, np.float32)}
    good = encode(trained, base, "int8")

    def broken(**changes: object) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        arrays = dict(good.arrays)
        metadata = dict(good.metadata)
        for key, value in changes.items():
            if key == "meta":
                metadata.update(value)  # type: ignore[arg-type]
            elif value is None:
                del arrays[key.replace("__", SCALE_SUFFIX)]
            else:
                arrays[key.replace("__", SCALE_SUFFIX)] = value  # type: ignore[assignment]
        return arrays, metadata

    cases = {
        "has no ::scale entry": broken(w__=None),
        "expected float32[]": broken(w__=np.ones(3, np.float32)),
        "int8 sends int8": broken(w=np.ones(BIG, np.float32)),
        "has shape [2, 128]": broken(w=np.ones((2, 128), np.int8)),
        "the model does not: extra": broken(extra=np.ones(2, np.float32)),
        "lacks tensors: b": broken(b=None),
        "unknown compression 'zip'": broken(meta={SCHEME_KEY: "zip"}),
        "is not JSON": broken(meta={DELTA_KEY: "["}),
        "only floating tensors": broken(meta={DELTA_KEY: '["w", "count"]'}),
    }
    for expected, (arrays, metadata) in cases.items():
        with pytest.raises(CompressionError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            decode(arrays, metadata, base)


@pytest.mark.parametrize("scheme", ["fp16", "bf16", "int8"])
def test_restored_pieces_are_the_decoded_tensors_bit_for_bit(scheme: str) -> None:
    # Prepare: a kernel (int8: a scale per channel), a matrix wider than a piece, a vector, an fp16 base tensor,
    # small and integer tensors sent exactly
    rng = np.random.default_rng(3)
    base = {
        "conv": rng.normal(size=(6, 3, 5, 5)).astype(np.float32),
        "wide": rng.normal(size=(3, 70_000)).astype(np.float32),
        "vec": rng.normal(size=300).astype(np.float32),
        "half": rng.normal(size=(20, 20)).astype(np.float16),
        "b": rng.normal(size=8).astype(np.float32),
        "count": np.array(3, np.int64),
    }
    trained = {n: (v + rng.normal(size=v.shape) * 0.01).astype(v.dtype) for n, v in base.items()}
    encoded = encode(trained, base, scheme)

    # Execute
    restored = Restored(encoded.arrays, encoded.metadata, base)
    pieces = {name: list(restored.pieces(name)) for name in base}
    decoded = decode(encoded.arrays, encoded.metadata, base)

    # Assert: the pieces, joined, are decode's tensors (dtype and bits), and so is each restored into an array of
    # its own (NaN-filled: every value overwritten), which is the result for a float32 tensor sent as a delta; the
    # layout names them as decode gives them
    for name, whole in decoded.items():
        joined = np.concatenate(pieces[name])
        assert joined.dtype == whole.dtype and joined.tobytes() == whole.tobytes(), name
        into = np.full(base[name].shape, np.nan, np.float32)
        again = restored.whole(name, into)
        assert again.dtype == whole.dtype and again.tobytes() == whole.tobytes(), name
        assert (again is into) == (name in {"conv", "wide", "vec"}), name
    assert len(pieces["wide"]) > 1
    assert {n: (a.dtype, a.shape) for n, a in restored.layout().items()} == {
        n: (a.dtype, a.shape) for n, a in decoded.items()
    }


def test_only_bounded_int8_deltas_are_surely_finite() -> None:
    base = {"w": np.zeros(BIG, np.float32), "b": np.zeros(16, np.float32), "count": np.array(7, np.int64)}
    trained = {"w": np.full(BIG, 0.5, np.float32), "b": np.ones(16, np.float32), "count": np.array(8, np.int64)}
    encoded = encode(trained, base, "int8")
    restored = Restored(encoded.arrays, encoded.metadata, base)
    assert restored.surely_finite("w", 1.0)
    # A base near float32's largest value, a NaN in the base: its values must be looked at
    assert not restored.surely_finite("w", 3e38)
    assert not restored.surely_finite("w", float("nan"))
    # Tensors sent exactly, and 16-bit deltas (which can hold Inf or NaN themselves), are never bounded
    assert not restored.surely_finite("b", 0.0)
    halves = encode(trained, base, "fp16")
    assert not Restored(halves.arrays, halves.metadata, base).surely_finite("w", 0.0)
    for scale in (np.nan, np.inf, 3e36):
        arrays = {**encoded.arrays, "w" + SCALE_SUFFIX: np.array(scale, np.float32)}
        assert not Restored(arrays, encoded.metadata, base).surely_finite("w", 0.0), scale


def test_encode_refuses_none_and_mismatched_tensors() -> None:
    base = _base()
    with pytest.raises(CompressionError, match="one of fp16, bf16, int8"):
        encode(base, base, "none")
    with pytest.raises(CompressionError, match="do not name the same tensors"):
        encode({"w": base["w"]}, base, "fp16")


def _file(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.numpy import save

    return save(arrays, metadata=metadata)


def test_pack_codes_a_big_files_segments_in_threads_into_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: 8 MiB of int8 codes of heavy-tailed deltas (coded) and a float tensor (its low bytes stored)
    rng = np.random.default_rng(5)
    codes = np.clip(rng.standard_t(2, size=(2048, 2048)) * 8, -127, 127).astype(np.int8)
    data = _file({"codes": codes, "w": rng.normal(size=(512, 1024)).astype(np.float32)})

    # Execute: in the calling thread, then in two
    monkeypatch.setattr(compression, "_CODING_THREADS", 1)
    alone = pack(data)
    monkeypatch.setattr(compression, "_CODING_THREADS", 2)
    threaded = pack(data)

    # Assert: the same bytes, which unpack to the file
    assert threaded == alone and len(alone) < len(data)
    assert unpack(threaded, len(data)) == data


def test_a_workers_thread_budget_bounds_its_packing_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from provider_runtime.runtime import configure_threads

    # Prepare: a process that would code in four threads; torch's own settings left as they are
    monkeypatch.setattr(compression, "_CODING_THREADS", 4)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)
    monkeypatch.setenv("DEML_TORCH_THREADS", "1")

    # Execute: a worker applies its budget
    configure_threads(default=None)

    # Assert: its packing stays in its one thread; a budget is never raised past the process's cores
    assert compression._CODING_THREADS == 1
    compression.set_coding_threads(8)
    assert compression._CODING_THREADS == 1


def test_pack_shuffles_each_tensors_bytes_by_significance_and_unpacks_bit_for_bit() -> None:
    # Prepare: every dtype an update carries, a 0-d tensor, an empty one, NaN bit patterns and metadata
    rng = np.random.default_rng(3)
    arrays = {
        "half": rng.normal(size=(33, 7)).astype(np.float16),
        "q": rng.integers(-127, 128, size=(5, 64), dtype=np.int8),
        "bf": np.array([0x7FC1, 0x3F80, 0x0001], np.uint16),
        "count": np.array(123456789, np.int64),
        "scale": np.array([np.nan, -0.0, 1e-30], np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }
    data = _file(arrays, {SCHEME_KEY: "int8", DELTA_KEY: '["q"]'})
    # The shuffle itself, exactly: two float16 values' bytes (lo0 hi0 lo1 hi1) go out as lo0 lo1 hi0 hi1, and the
    # bytes outside the ranges are copied as they are
    two = np.array([7, 0x00, 0x3C, 0x00, 0xC0, 9], np.uint8)
    out = np.zeros(6, np.uint8)
    _shuffled(two, out, [(1, 5, 2)], inverse=False)
    assert out.tolist() == [7, 0x00, 0x00, 0x3C, 0xC0, 9]
    back = np.zeros(6, np.uint8)
    _shuffled(out, back, [(1, 5, 2)], inverse=True)
    assert back.tolist() == two.tolist()

    # Execute
    packed = pack(data)

    # Assert: the same bytes back, every one of them; and the file is smaller
    assert is_packed(packed) and not is_packed(data)
    assert unpack(packed, len(data)) == data
    assert len(packed) < len(data)
    small = _file({"h": np.array([1.0, -2.0], np.float16)})
    assert unpack(pack(small), len(small)) == small


def _table(packed: bytes) -> list[tuple[int, int, int]]:
    """The packed file's segment table: (method, length, length unpacked) per segment (method 0 stored, 1 coded)."""
    _, _, head, count = struct.unpack_from("<8sQII", packed)
    return [struct.unpack_from("<BII", packed, 24 + head + 9 * i) for i in range(count)]


def test_pack_codes_the_segments_that_save_a_quarter_and_stores_the_rest() -> None:
    # Prepare: 3 segments of int8 codes in -3..3 (under 3 bits of entropy: coded) and 2 of random bytes (8 bits:
    # stored); safetensors lays the I8 tensor out before the U8 one, from the data's first byte
    rng = np.random.default_rng(5)
    arrays = {
        "q": rng.integers(-3, 4, size=3 * SEGMENT, dtype=np.int8),
        "r": rng.integers(0, 256, size=2 * SEGMENT, dtype=np.uint8),
    }
    data = _file(arrays)

    # Execute
    packed = pack(data)

    # Assert: which segments were coded, the stored ones verbatim, and the file back bit for bit
    table = _table(packed)
    assert [method for method, _, _ in table] == [1, 1, 1, 0, 0]
    assert [(length, size) for _, length, size in table][3:] == [(SEGMENT, SEGMENT)] * 2
    assert all(length < 0.45 * SEGMENT and size == SEGMENT for _, length, size in table[:3])
    assert unpack(packed, len(data)) == data


def test_pack_cuts_a_float_tensor_at_its_byte_places_and_codes_only_the_high_ones() -> None:
    # Prepare: a small float16 tensor (far below SEGMENT) whose low-order bytes are random and high-order bytes
    # take 4 values: one segment each, the low bytes stored and the high ones coded
    rng = np.random.default_rng(6)
    high = rng.choice(np.array([0x3C, 0x3D, 0xBC, 0xBD], np.uint16), size=4096)
    values = ((high << 8) | rng.integers(0, 256, size=4096, dtype=np.uint16)).view(np.float16)
    data = _file({"w": values})

    # Execute
    packed = pack(data)

    # Assert
    table = _table(packed)
    assert [(method, size) for method, _, size in table] == [(0, 4096), (1, 4096)]
    assert table[0][1] == 4096 and table[1][1] < 0.3 * 4096
    assert unpack(packed, len(data)) == data


@pytest.mark.parametrize(("values", "coded"), [(32, True), (128, False), (2, True), (256, False)])
def test_a_segment_is_coded_when_its_byte_entropy_saves_a_quarter(values: int, coded: bool) -> None:
    # Uniform over `values` byte values: log2(values) bits a byte; coding pays below 8 * (1 - 1/4) = 6 bits
    assert MIN_SAVING == 1 / 4
    segment = np.random.default_rng(0).integers(0, values, size=SEGMENT).astype(np.uint8)
    assert _worth_coding(segment) is coded


def _repacked(packed: bytes, table: list[tuple[int, int, int]], streams: list[bytes]) -> bytes:
    """The packed file with its segment table and segments replaced."""
    magic, size, head, _ = struct.unpack_from("<8sQII", packed)
    start = struct.pack("<8sQII", magic, size, head, len(table)) + packed[24 : 24 + head]
    return start + b"".join(struct.pack("<BII", *entry) for entry in table) + b"".join(streams)


def test_unpack_refuses_bombs_cut_short_and_stray_bytes_by_name() -> None:
    data = _file({"w": np.zeros((64, 64), np.float16)})
    packed = pack(data)
    body = len(data) - (8 + struct.unpack_from("<Q", data)[0])
    with pytest.raises(CompressionError, match=f"declares {len(data):,} bytes unpacked, more than the 100 allowed"):
        unpack(packed, 100)
    bomb = zlib.compress(bytes(1 << 24))
    with pytest.raises(CompressionError, match=f"the packed data unpacks to more than the {body:,} bytes it declares"):
        unpack(_repacked(packed, [(1, len(bomb), body)], [bomb]), 1 << 40)
    with pytest.raises(CompressionError, match="the packed data is cut short: segment 1 has"):
        unpack(packed[:-3], len(data))
    with pytest.raises(CompressionError, match="the packed data is followed by 1 stray bytes"):
        unpack(packed + b"x", len(data))
    with pytest.raises(CompressionError, match="the packed data is not a valid zlib stream"):
        unpack(_repacked(packed, [(1, 8, body)], [b"garbage!"]), len(data))
    short = zlib.compress(bytes(body - 1))
    with pytest.raises(CompressionError, match=f"the packed data is cut short: {body - 1:,} of {body:,} bytes"):
        unpack(_repacked(packed, [(1, len(short), body)], [short]), len(data))
    with pytest.raises(CompressionError, match=f"stored segment 0 has {body - 1:,} bytes, not {body:,}"):
        unpack(_repacked(packed, [(0, body - 1, body)], [bytes(body - 1)]), len(data))
    with pytest.raises(CompressionError, match="segment 0 has an unknown method 7"):
        unpack(_repacked(packed, [(7, body, body)], [bytes(body)]), len(data))
    with pytest.raises(CompressionError, match="the packed data's segments unpack to 8,193 bytes, not 8,192"):
        unpack(_repacked(packed, [(0, body, body), (0, 1, 1)], [bytes(body + 1)]), len(data))
    with pytest.raises(CompressionError, match="not a packed update"):
        unpack(data, len(data))
