"""{{name}}: a genpipe plugin for the `image-step` world, in Python.

It draws a gradient whose colours come from the prompt, as a PNG of the requested size,
charging `credits_per_image` (a setting, default 1). Replace `generate` with your own.
"""

import struct
import zlib

import wit_world
from wit_world.imports import config, credits, status


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class WitWorld(wit_world.WitWorld):
    def generate(self, request: wit_world.ImageRequest) -> wit_world.ImageResponse:
        credits.charge(int(config.get("credits_per_image") or "1"), "image")
        status.report(status.Stage.PREPARING, 0.0, "choosing colours")
        seed = zlib.crc32(request.prompt.encode())
        r, g, b = seed & 0xFF, (seed >> 8) & 0xFF, (seed >> 16) & 0xFF
        w, h = request.width, request.height
        rows = bytearray()
        for y in range(h):
            rows.append(0)
            for x in range(w):
                rows += bytes((r * (x + 1) // w, g * (y + 1) // h, b))
        status.report(status.Stage.FINISHING, 1.0, "encoding the PNG")
        return wit_world.ImageResponse(bytes=png(w, h, bytes(rows)), mime_type="image/png")
