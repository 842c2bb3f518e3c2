//! `POST /v1/images/generations`: one PNG of the requested size, as `b64_json`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

use crate::stats::Endpoint;
use crate::text::hash;
use crate::{AppState, Mode, error, refusal};

/// Largest side the server draws.
const MAX_SIDE: u32 = 4096;

#[derive(Deserialize)]
struct ImageRequest {
    model: String,
    prompt: String,
    #[serde(default = "one")]
    n: u32,
    #[serde(default = "default_size")]
    size: String,
    #[serde(default = "default_format")]
    response_format: String,
}

fn one() -> u32 {
    1
}

fn default_size() -> String {
    "1024x1024".into()
}

fn default_format() -> String {
    "url".into()
}

/// The handler.
pub(crate) async fn generations(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let request: ImageRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", format!("invalid request body: {e}")),
    };
    let (stats, model) = (&state.stats, request.model.as_str());
    let attempt = stats.request(Endpoint::Images, model);
    if let Some(refused) = refusal(&state, &headers, model, attempt) {
        stats.failed(Endpoint::Images, model);
        return refused;
    }
    let invalid = |message: String| {
        stats.failed(Endpoint::Images, model);
        error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    };
    if request.n != 1 {
        return invalid(format!("this server draws one image per request, not n = {}", request.n));
    }
    if request.response_format != "b64_json" {
        return invalid(format!("this server answers only response_format = \"b64_json\", not \"{}\"", request.response_format));
    }
    let Some((width, height)) = parse_size(&request.size) else {
        return invalid(format!("size must be WIDTHxHEIGHT with sides from 1 to {MAX_SIDE}, not '{}'", request.size));
    };
    let mode = Mode::of(model);
    if mode == Mode::SlowFirstByte {
        tokio::time::sleep(state.options.first_byte_delay).await;
    }
    let (width, height) = match mode {
        Mode::WrongSize => (width.div_ceil(2), height.div_ceil(2)),
        _ => (width, height),
    };
    let png = draw(&request.prompt, width, height);
    stats.completed(Endpoint::Images, model);
    let b64 = base64::engine::general_purpose::STANDARD.encode(png);
    axum::Json(json!({ "created": 0, "data": [{ "b64_json": b64, "revised_prompt": request.prompt }] })).into_response()
}

/// `WIDTHxHEIGHT`, each side from 1 to [`MAX_SIDE`].
fn parse_size(size: &str) -> Option<(u32, u32)> {
    let (w, h) = size.split_once('x')?;
    let side = |s: &str| s.parse::<u32>().ok().filter(|v| (1..=MAX_SIDE).contains(v));
    Some((side(w)?, side(h)?))
}

/// A gradient whose colours derive from the prompt, as an RGB PNG.
fn draw(prompt: &str, width: u32, height: u32) -> Vec<u8> {
    let seed = hash(prompt).to_le_bytes();
    let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (x * 255 / width.max(2).saturating_sub(1), y * 255 / height.max(2).saturating_sub(1));
            pixels.extend([seed[0] ^ fx as u8, seed[1] ^ fy as u8, seed[2].wrapping_add(((fx + fy) / 2) as u8)]);
        }
    }
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().expect("a PNG header in memory");
    writer.write_image_data(&pixels).expect("a PNG in memory");
    writer.finish().expect("a PNG in memory");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_within_bounds() {
        assert_eq!(parse_size("512x384"), Some((512, 384)));
        assert_eq!(parse_size("0x10"), None);
        assert_eq!(parse_size("5000x10"), None);
        assert_eq!(parse_size("512"), None);
    }

    #[test]
    fn drawings_are_pngs_of_the_size_asked() {
        let png = draw("a lighthouse", 7, 3);
        let reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (7, 3));
    }
}
