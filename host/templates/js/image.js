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

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

const u32 = (n) => [(n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff];

function chunk(kind, data) {
  const body = [...new TextEncoder().encode(kind), ...data];
  return [...u32(data.length), ...body, ...u32(crc32(body))];
}

// A PNG of `rows` (a filter byte and the RGB pixels of each row), stored without compression.
function png(width, height, rows) {
  const zlib = [0x78, 0x01];
  for (let at = 0; at < rows.length || at === 0; at += 65535) {
    const block = rows.subarray(at, at + 65535);
    const last = at + 65535 >= rows.length ? 1 : 0;
    zlib.push(last, block.length & 0xff, block.length >> 8, ~block.length & 0xff, (~block.length >> 8) & 0xff, ...block);
  }
  let a = 1;
  let b = 0;
  for (const byte of rows) {
    a = (a + byte) % 65521;
    b = (b + a) % 65521;
  }
  zlib.push(...u32(((b << 16) | a) >>> 0));
  const header = [...u32(width), ...u32(height), 8, 2, 0, 0, 0];
  const signature = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  return new Uint8Array([...signature, ...chunk('IHDR', header), ...chunk('IDAT', zlib), ...chunk('IEND', [])]);
}

export function generate(request) {
  charge(BigInt(get('credits_per_image') ?? '1'), 'image');
  report('preparing', 0, 'choosing colours');
  const seed = crc32(new TextEncoder().encode(request.prompt));
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
