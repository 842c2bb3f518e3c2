// {{name}}: a genpipe plugin for the `image-step` world, in JavaScript.
//
// It draws a gradient whose colours come from the prompt, as an uncompressed PNG of the
// requested size, charging `credits_per_image` (a setting, default 1). Replace `generate` with
// your own.

import { get } from 'genpipe:plugin/config@0.1.0';
import { charge } from 'genpipe:plugin/credits@0.1.0';
import { report } from 'genpipe:plugin/status@0.1.0';

const CRC = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes, crc = 0xffffffff) {
  for (const b of bytes) crc = CRC[(crc ^ b) & 0xff] ^ (crc >>> 8);
  return crc;
}

const u32 = (n) => [(n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff];

function chunk(parts, kind, data) {
  const type = new TextEncoder().encode(kind);
  parts.push(new Uint8Array(u32(data.length)), type, data);
  parts.push(new Uint8Array(u32((crc32(data, crc32(type)) ^ 0xffffffff) >>> 0)));
}

// A PNG of `rows` (a filter byte, then RGB pixels, per row) in stored deflate blocks.
function png(width, height, rows) {
  const blocks = Math.max(1, Math.ceil(rows.length / 65535));
  const zlib = new Uint8Array(2 + rows.length + blocks * 5 + 4);
  zlib.set([0x78, 0x01]);
  let at = 2;
  for (let i = 0; i < blocks; i++) {
    const block = rows.subarray(i * 65535, (i + 1) * 65535);
    zlib.set([i + 1 === blocks ? 1 : 0, block.length & 0xff, block.length >> 8, ~block.length & 0xff, (~block.length >> 8) & 0xff], at);
    zlib.set(block, at + 5);
    at += 5 + block.length;
  }
  let a = 1;
  let b = 0;
  for (const byte of rows) {
    a = (a + byte) % 65521;
    b = (b + a) % 65521;
  }
  zlib.set(u32(((b << 16) | a) >>> 0), at);
  const parts = [new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])];
  chunk(parts, 'IHDR', new Uint8Array([...u32(width), ...u32(height), 8, 2, 0, 0, 0]));
  chunk(parts, 'IDAT', zlib);
  chunk(parts, 'IEND', new Uint8Array(0));
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

export function generate(request) {
  charge(BigInt(get('credits_per_image') ?? '1'), 'image');
  report('preparing', 0, 'choosing colours');
  const seed = (crc32(new TextEncoder().encode(request.prompt)) ^ 0xffffffff) >>> 0;
  const [r, g, b] = [seed & 0xff, (seed >>> 8) & 0xff, (seed >>> 16) & 0xff];
  const { width, height } = request;
  const rows = new Uint8Array((width * 3 + 1) * height);
  let at = 0;
  for (let y = 0; y < height; y++) {
    rows[at++] = 0;
    for (let x = 0; x < width; x++) {
      rows[at++] = Math.floor((r * (x + 1)) / width);
      rows[at++] = Math.floor((g * (y + 1)) / height);
      rows[at++] = b;
    }
  }
  report('finishing', 1, 'encoding the PNG');
  return { bytes: png(width, height, rows), mimeType: 'image/png' };
}
