// js-image: an `image-step` plugin in JavaScript (componentize-js).
//
// It draws a night sky over hills: the prompt's words seed the palette, the stars and the
// shape of the hills, so the same prompt and seed give the same picture. It charges
// `credits_per_megapixel` (a setting, default 10, at least 1 credit) up front, reports progress
// every eighth of the rows, stops when the run is cancelled, and returns a PNG of the requested
// size (stored deflate blocks: no compression library is needed).

import { get } from 'genpipe:plugin/config@0.1.0';
import { charge } from 'genpipe:plugin/credits@0.1.0';
import { cancelled, report } from 'genpipe:plugin/status@0.1.0';

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

// A seeded generator (mulberry32): the same prompt and seed draw the same picture.
function random(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function generate(request) {
  const { width, height } = request;
  const price = BigInt(get('credits_per_megapixel') ?? '10');
  const cost = (price * BigInt(width) * BigInt(height) + 999999n) / 1000000n;
  charge(cost > 0n ? cost : 1n, 'megapixel');
  report('preparing', 0, 'mixing the palette');
  const hash = crc32(new TextEncoder().encode(request.prompt));
  const rng = random(hash ^ Number(request.seed & 0xffffffffn));
  const sky = [20 + rng() * 40, 20 + rng() * 40, 60 + rng() * 80];
  const land = [30 + rng() * 60, 70 + rng() * 90, 30 + rng() * 50];
  const hills = Array.from({ length: 3 }, () => ({ phase: rng() * 6.28, scale: 2 + rng() * 6, height: 0.15 + rng() * 0.2 }));
  const stars = new Set(Array.from({ length: Math.ceil((width * height) / 400) }, () => Math.floor(rng() * width * height)));

  const rows = new Uint8Array((width * 3 + 1) * height);
  let at = 0;
  for (let y = 0; y < height; y++) {
    if (y % Math.max(1, Math.ceil(height / 8)) === 0) {
      if (cancelled()) throw { tag: 'cancelled' };
      report('generating', y / height, 'painting');
    }
    rows[at++] = 0;
    for (let x = 0; x < width; x++) {
      const ground = hills.reduce((top, h) => Math.min(top, 1 - h.height * (1 + Math.sin((x / width) * h.scale + h.phase)) / 2), 1);
      const v = y / height;
      let colour;
      if (v > ground) {
        const shade = 0.6 + 0.4 * (1 - (v - ground));
        colour = land.map((c) => c * shade);
      } else if (stars.has(y * width + x)) {
        colour = [255, 255, 230];
      } else {
        colour = sky.map((c) => c * (0.5 + v));
      }
      rows[at++] = Math.min(255, colour[0]);
      rows[at++] = Math.min(255, colour[1]);
      rows[at++] = Math.min(255, colour[2]);
    }
  }
  report('finishing', 1, 'encoding the PNG');
  return { bytes: png(width, height, rows), mimeType: 'image/png' };
}
