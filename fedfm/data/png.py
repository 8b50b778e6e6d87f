"""Minimal PNG reader/writer (zlib + numpy) for when Pillow is not installed.

Reads non-interlaced 8- or 16-bit gray, gray+alpha, RGB, RGBA and 8-bit palette images;
writes 8-bit gray, RGB or RGBA. Anything else needs Pillow (``pip install pillow``).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _chunks(data: bytes, path: Path):
    pos = len(_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        yield kind, data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IEND":
            return
    raise ValueError(f"{path}: truncated PNG (no IEND chunk)")


def _unfilter(raw: np.ndarray, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo PNG's per-row filters; returns (height, stride) uint8."""
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.int64)
    for r in range(height):
        kind, line = int(rows[r, 0]), rows[r, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: running sum per byte position within a pixel
            cur = np.cumsum(line.reshape(-1, bpp), axis=0).ravel() & 255
        elif kind == 2:  # Up
            cur = (line + prev) & 255
        elif kind in (3, 4):  # Average / Paeth: sequential
            cur = line.copy()
            for i in range(stride):
                left = cur[i - bpp] if i >= bpp else 0
                up = prev[i]
                if kind == 3:
                    pred = (left + up) >> 1
                else:
                    ul = prev[i - bpp] if i >= bpp else 0
                    p = left + up - ul
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else ul)
                cur[i] = (cur[i] + pred) & 255
        else:
            raise ValueError(f"bad PNG filter type {kind}")
        out[r] = cur
        prev = cur
    return out


def read_png(path: str | Path) -> np.ndarray:
    """(H, W) or (H, W, C) uint8/uint16 array of a PNG file."""
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file")
    header, idat, palette = None, [], None
    for kind, body in _chunks(data, path):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
    if header is None:
        raise ValueError(f"{path}: PNG without IHDR")
    width, height, depth, color, _, _, interlace = header
    if color not in _CHANNELS or depth not in (8, 16) or interlace or (color == 3 and depth != 8):
        raise ValueError(
            f"{path}: PNG with bit depth {depth}, colour type {color}, interlace {interlace} is not supported "
            "without Pillow: pip install pillow"
        )
    channels, nbytes = _CHANNELS[color], depth // 8
    bpp = channels * nbytes
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    pixels = _unfilter(raw, height, width * bpp, bpp)
    if nbytes == 2:
        img = pixels.reshape(height, width * channels, 2).astype(np.uint16)
        img = ((img[..., 0] << 8) | img[..., 1]).reshape(height, width, channels)
    else:
        img = pixels.reshape(height, width, channels)
    if color == 3:
        if palette is None:
            raise ValueError(f"{path}: palette PNG without PLTE chunk")
        img = palette[img[..., 0]]
    return img[..., 0] if img.shape[-1] == 1 else img


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as a PNG (no filtering)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"write_png needs uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    color = {2: 0}.get(img.ndim) if img.ndim == 2 else {3: 2, 4: 6}.get(img.shape[-1])
    if color is None:
        raise ValueError(f"write_png needs (H, W), (H, W, 3) or (H, W, 4), got {img.shape}")
    height, width = img.shape[:2]
    rows = np.ascontiguousarray(img).reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    Path(path).write_bytes(_SIGNATURE + body)
