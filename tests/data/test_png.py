import struct
import zlib

import numpy as np
import pytest

from fedfm.data.png import read_png, write_png


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def encode_filtered(img: np.ndarray, color: int, depth: int = 8) -> bytes:
    """A PNG whose row r uses filter r % 5 (so the decoder must undo all five)."""
    h, w = img.shape[:2]
    if depth == 16:
        rows = img.astype(">u2").view(np.uint8).reshape(h, -1)
    else:
        rows = img.reshape(h, -1).astype(np.uint8)
    channels = 1 if img.ndim == 2 else img.shape[2]
    bpp = channels * depth // 8
    out, prev = bytearray(), np.zeros(rows.shape[1], int)
    for r in range(h):
        line = rows[r].astype(int)
        kind = r % 5
        filt = []
        for i, x in enumerate(line):
            left = line[i - bpp] if i >= bpp else 0
            up = prev[i]
            ul = prev[i - bpp] if i >= bpp else 0
            pred = [0, left, up, (left + up) // 2, paeth(left, up, ul)][kind]
            filt.append((x - pred) % 256)
        out += bytes([kind] + filt)
        prev = line

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(out))) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("shape,color", [((9, 7), 0), ((10, 6, 3), 2), ((6, 5, 4), 6), ((5, 5, 2), 4)])
def test_decoder_undoes_every_filter(tmp_path, shape, color):
    img = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    (tmp_path / "f.png").write_bytes(encode_filtered(img, color))
    assert np.array_equal(read_png(tmp_path / "f.png"), img)


def test_sixteen_bit_gray(tmp_path):
    img = np.random.default_rng(1).integers(0, 65536, (6, 7)).astype(np.uint16)
    (tmp_path / "g16.png").write_bytes(encode_filtered(img, 0, depth=16))
    out = read_png(tmp_path / "g16.png")
    assert out.dtype == np.uint16 and np.array_equal(out, img)


def test_write_read_roundtrip(tmp_path):
    img = np.random.default_rng(2).integers(0, 256, (12, 9, 3)).astype(np.uint8)
    write_png(tmp_path / "rgb.png", img)
    assert np.array_equal(read_png(tmp_path / "rgb.png"), img)
    with pytest.raises(ValueError):
        write_png(tmp_path / "bad.png", img.astype(np.float32))
