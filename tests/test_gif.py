"""GIF89a writer (rgs_engine.io.images.write_gif, encoded by Pillow), checked by a minimal
decoder written here."""
import io
import struct

import numpy as np
import pytest

from rgs_engine.core.errors import RgsInputError
from rgs_engine.io.images import encode_gif, write_gif


def _lzw_decode(data: bytes, min_size: int) -> bytes:
    """Decode GIF LZW ``data`` (codes packed LSB first) into palette indices."""
    padded = data + b"\0\0\0"
    clear, end = 1 << min_size, (1 << min_size) + 1
    table = [bytes([i]) for i in range(clear)] + [b"", b""]
    size, pos, prev, out = min_size + 1, 0, None, bytearray()
    while True:
        byte = pos >> 3
        word = padded[byte] | padded[byte + 1] << 8 | padded[byte + 2] << 16
        code = (word >> (pos & 7)) & ((1 << size) - 1)
        pos += size
        if code == clear:
            del table[end + 1:]
            size, prev = min_size + 1, None
            continue
        if code == end:
            return bytes(out)
        if prev is None:
            entry = table[code]
        else:
            entry = table[code] if code < len(table) else table[prev] + table[prev][:1]
            if len(table) < 4096:
                table.append(table[prev] + entry[:1])
        out += entry
        if len(table) == 1 << size and size < 12:
            size += 1
        prev = code


def _sub_blocks(data: bytes, pos: int) -> tuple[bytes, int]:
    chunks = []
    while data[pos]:
        chunks.append(data[pos + 1:pos + 1 + data[pos]])
        pos += 1 + data[pos]
    return b"".join(chunks), pos + 1


def _decode_gif(data: bytes) -> tuple[np.ndarray, list[int], int | None]:
    """(frames (T, H, W, 3) uint8, delays in 1/100 s, loop count) of a GIF with a global
    palette; a frame may carry its own palette and cover a sub-rectangle drawn over the
    previous frame (how Pillow stores frames that change only there)."""
    assert data[:6] == b"GIF89a" and data[-1:] == b"\x3b"
    w, h, packed, _, _ = struct.unpack("<HHBBB", data[6:13])
    assert packed & 0x80
    n = 2 ** ((packed & 7) + 1)
    palette = np.frombuffer(data, np.uint8, 3 * n, 13).reshape(n, 3)
    pos, frames, delays, loop = 13 + 3 * n, [], [], None
    canvas = np.zeros((h, w, 3), np.uint8)
    while data[pos] != 0x3B:
        if data[pos] == 0x21:
            label = data[pos + 1]
            if label == 0xFF:  # application extension: first sub-block is its name
                name_len = data[pos + 2]
                name = data[pos + 3:pos + 3 + name_len]
                body, pos = _sub_blocks(data, pos + 3 + name_len)
                if name == b"NETSCAPE2.0":
                    loop = struct.unpack("<H", body[1:3])[0]
            else:
                body, pos = _sub_blocks(data, pos + 2)
                if label == 0xF9:
                    delays.append(struct.unpack("<H", body[1:3])[0])
        else:
            assert data[pos] == 0x2C
            x, y, fw, fh, flags = struct.unpack("<HHHHB", data[pos + 1:pos + 10])
            assert x + fw <= w and y + fh <= h and not flags & 0x40  # not interlaced
            pos += 10
            colours = palette
            if flags & 0x80:  # local palette
                m = 2 ** ((flags & 7) + 1)
                colours = np.frombuffer(data, np.uint8, 3 * m, pos).reshape(m, 3)
                pos += 3 * m
            min_size = data[pos]
            lzw, pos = _sub_blocks(data, pos + 1)
            idx = np.frombuffer(_lzw_decode(lzw, min_size), np.uint8)
            canvas = canvas.copy()
            canvas[y:y + fh, x:x + fw] = colours[idx.reshape(fh, fw)]
            frames.append(canvas)
    return np.stack(frames), delays, loop


def _grey_frames() -> np.ndarray:
    """A gradient, a random frame (fills the 4096-code table several times), a flat one."""
    rng = np.random.default_rng(0)
    ramp = np.tile(np.arange(96, dtype=np.uint8) * 2, (80, 1))
    return np.stack([ramp, rng.integers(0, 256, (80, 96), dtype=np.uint8), np.full((80, 96), 7, np.uint8)])


def test_grey_round_trip_is_exact_and_loops(tmp_path):
    frames = _grey_frames()
    path = write_gif(tmp_path / "a.gif", frames, fps=20)
    decoded, delays, loop = _decode_gif(path.read_bytes())
    assert decoded.shape == (3, 80, 96, 3)
    np.testing.assert_array_equal(decoded[..., 0], frames)
    assert np.all(decoded == decoded[..., :1])  # grey palette
    assert delays == [5, 5, 5] and loop == 0
    tiny = np.array([[[0]], [[255]]], np.uint8)  # 1x1 frames
    np.testing.assert_array_equal(_decode_gif(encode_gif(tiny, fps=200))[0][..., 0], tiny)
    assert _decode_gif(encode_gif(tiny, fps=200))[1] == [2, 2]  # viewers slow shorter delays


def test_colour_frames_exact_up_to_256_colours_else_colour_cube():
    rng = np.random.default_rng(1)
    few = (rng.integers(0, 4, (2, 9, 11, 3)) * 85).astype(np.uint8)  # 64 colours
    np.testing.assert_array_equal(_decode_gif(encode_gif(few))[0], few)
    many = rng.integers(0, 256, (2, 30, 40, 3), dtype=np.uint8)
    decoded = _decode_gif(encode_gif(many))[0]
    assert set(np.unique(decoded).tolist()) <= set(range(0, 256, 51))
    assert np.abs(decoded.astype(int) - many).max() <= 26


def test_atomic_no_clobber_and_bad_input(tmp_path):
    frames = _grey_frames()
    target = write_gif(tmp_path / "m.gif", frames)
    with pytest.raises(RgsInputError, match="exists: pass --force"):
        write_gif(target, frames[:1])
    write_gif(target, frames[:1], force=True)
    assert len(_decode_gif(target.read_bytes())[0]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.gif"]  # no temporary left
    for bad, fps, text in ((frames.astype(np.float32), 10, "uint8"), (frames[0], 10, "uint8"),
                           (frames[:0], 10, "non-empty"), (frames, 0, "positive")):
        with pytest.raises(RgsInputError, match=text):
            encode_gif(bad, fps)


def test_pillow_reads_it_too_when_installed():
    image = pytest.importorskip("PIL.Image")
    frames = _grey_frames()
    gif = image.open(io.BytesIO(encode_gif(frames)))
    decoded = []
    for k in range(gif.n_frames):
        gif.seek(k)
        decoded.append(np.asarray(gif.convert("L")))
    np.testing.assert_array_equal(np.stack(decoded), frames)
