//! {{name}}: a genpipe plugin for the `image-step` world.
//!
//! It draws a gradient whose colours come from the prompt, as an uncompressed PNG of the
//! requested size, charging `credits_per_image` (a setting, default 1). Replace `generate` with
//! your own.

use genpipe_plugin_sdk::image::{ImageRequest, ImageResponse};
use genpipe_plugin_sdk::{ImagePlugin, StepError, credits, progress, settings};

struct Plugin;

impl ImagePlugin for Plugin {
    fn generate(request: ImageRequest) -> Result<ImageResponse, StepError> {
        credits::charge(settings::get_or("credits_per_image", 1u64)?, "image")?;
        progress::preparing("choosing colours");
        let hash = request.prompt.bytes().fold(2166136261u32, |h, b| (h ^ u32::from(b)).wrapping_mul(16777619));
        let [r, g, b, _] = hash.to_le_bytes();
        let (width, height) = (request.width, request.height);
        let mut rows = Vec::with_capacity(((width * 3 + 1) * height) as usize);
        for y in 0..height {
            rows.push(0); // no filter
            for x in 0..width {
                let shade = |c: u8, t: u32, size: u32| (u32::from(c) * t / size.max(1)) as u8;
                rows.extend([shade(r, x + 1, width), shade(g, y + 1, height), b]);
            }
        }
        progress::finishing("encoding the PNG");
        Ok(ImageResponse { bytes: png(width, height, &rows), mime_type: "image/png".into() })
    }
}

/// An RGB PNG of `rows` (each a filter byte and its pixels), stored without compression.
fn png(width: u32, height: u32, rows: &[u8]) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        out.extend(crc32(&out[start..]).to_be_bytes());
    }
    let mut header = Vec::new();
    header.extend(width.to_be_bytes());
    header.extend(height.to_be_bytes());
    header.extend([8, 2, 0, 0, 0]);
    // A zlib stream of stored deflate blocks.
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = rows.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        zlib.extend(len.to_le_bytes());
        zlib.extend((!len).to_le_bytes());
        zlib.extend(*block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for byte in rows {
        a = (a + u32::from(*byte)) % 65521;
        b = (b + a) % 65521;
    }
    zlib.extend(((b << 16) | a).to_be_bytes());
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    chunk(&mut out, b"IHDR", &header);
    chunk(&mut out, b"IDAT", &zlib);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

genpipe_plugin_sdk::export_image!(Plugin);
