//! An `image-step` plugin that calls an OpenAI-compatible Images endpoint
//! (`POST {base_url}/v1/images/generations` with `response_format: "b64_json"`, `n: 1`) through
//! `wasi:http`, so only where the operator's `allowed_hosts` lets it.
//!
//! Config (`[plugins.NAME] config = {...}`; any other key is an error):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `base_url` | required | the server's root, e.g. `https://api.openai.com` (a trailing `/v1` is dropped) |
//! | `model` | required | the model asked for |
//! | `api_key` | none | sent as `Authorization: Bearer`; give it as `{ env = "VAR" }` or `{ secret = "..." }` |
//! | `size` | the step's `WIDTHxHEIGHT` | the size asked of the server, for models that draw only some sizes (`1024x1024`) |
//! | `price_per_image` | 0 | credits charged per image |
//! | `request_timeout_ms` | the host's `http_timeout_ms` | limit of each wait: connecting, the first byte, between chunks |
//! | `max_retries`, `retry_base_ms`, `retry_max_ms` | 3, 200, 5000 | retries of 429 and 5xx answers (see `upstream`) |
//!
//! The answer's `data[0].b64_json` must decode to a PNG. One of another size than the step asked
//! for (the host accepts only that size) is resized to it, nearest neighbour, keeping its colour
//! type. Charging: `price_per_image`, once, after the image is ready; a step whose budget is
//! smaller fails with `out-of-credits` before it calls the server. Failed attempts and failed
//! steps charge nothing.

#[path = "../../llm-openai/src/upstream.rs"]
mod upstream;

use std::io::Cursor;

use base64::Engine;
use genpipe_plugin_sdk::credits::ChargeError;
use genpipe_plugin_sdk::image::{Guest, ImageRequest, ImageResponse};
use genpipe_plugin_sdk::log::{self, Level};
use genpipe_plugin_sdk::status::{self, Stage};
use genpipe_plugin_sdk::{StepError, config, credits};
use serde::Deserialize;
use serde_json::json;

use upstream::{SERVER_KEYS, Server, number};

const PATH: &str = "/v1/images/generations";
/// Config keys of this plugin besides the server's.
const KEYS: [&str; 2] = ["size", "price_per_image"];
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// This plugin's config.
struct Settings {
    server: Server,
    size: Option<(u32, u32)>,
    price: u64,
}

impl Settings {
    fn from_config() -> Result<Settings, StepError> {
        let known: Vec<&str> = SERVER_KEYS.iter().chain(&KEYS).copied().collect();
        upstream::check_keys("image-openai", &known)?;
        let size = match config::get("size") {
            None => None,
            Some(size) => Some(parse_size(&size).ok_or_else(|| {
                StepError::InvalidInput(format!("config `size` = '{size}' must be WIDTHxHEIGHT, e.g. 1024x1024"))
            })?),
        };
        Ok(Settings { server: Server::from_config()?, size, price: number("price_per_image")?.unwrap_or(0) })
    }
}

/// `WIDTHxHEIGHT`, both at least 1.
fn parse_size(size: &str) -> Option<(u32, u32)> {
    let (w, h) = size.trim().split_once('x')?;
    let side = |s: &str| s.parse::<u32>().ok().filter(|&v| v > 0);
    Some((side(w)?, side(h)?))
}

/// The answer: the images drawn.
#[derive(Deserialize)]
struct Answer {
    data: Vec<Drawn>,
}

#[derive(Deserialize)]
struct Drawn {
    #[serde(default)]
    b64_json: Option<String>,
}

struct OpenAiImage;

impl Guest for OpenAiImage {
    fn generate(request: ImageRequest) -> Result<ImageResponse, StepError> {
        status::report(Stage::Preparing, 0.0, "preparing the request");
        let settings = Settings::from_config()?;
        if request.prompt.trim().is_empty() {
            return Err(StepError::InvalidInput("the prompt is empty; give the run a prompt".into()));
        }
        let (price, budget) = (settings.price, credits::remaining());
        if price > budget {
            return Err(StepError::OutOfCredits(format!(
                "an image costs {price} credits (price_per_image) but the step may spend {budget}; raise the step's max_cost"
            )));
        }
        let server = &settings.server;
        let (width, height) = settings.size.unwrap_or((request.width, request.height));
        let body = json!({
            "model": server.model,
            "prompt": request.prompt,
            "n": 1,
            "size": format!("{width}x{height}"),
            "response_format": "b64_json",
        });
        status::report(Stage::Preparing, 0.0, &format!("asking {} at {}", server.model, server.base_url));
        let response = server.post(PATH, &body.to_string())?;
        status::report(Stage::Generating, 0.5, "receiving the image");
        let url = server.url(PATH);
        let body = response.bytes().map_err(|e| server.failure(&url, e))?;
        let answer: Answer = serde_json::from_slice(&body)
            .map_err(|e| StepError::Upstream(format!("the answer from {url} is not an image generation: {e}")))?;
        let encoded = answer.data.into_iter().next().and_then(|d| d.b64_json).ok_or_else(|| {
            StepError::Upstream(format!(
                "the answer from {url} has no data[0].b64_json; the server must support response_format b64_json"
            ))
        })?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|e| StepError::Upstream(format!("the image from {url} is not valid base64: {e}")))?;
        status::report(Stage::Finishing, 0.8, "checking the image");
        let fitted =
            fit(png, request.width, request.height).map_err(|why| StepError::Upstream(format!("the image from {url} {why}")))?;
        if let Some((w, h)) = fitted.drawn {
            log::log(Level::Info, &format!("the server drew {w}x{h}; resized to {}x{}", request.width, request.height));
        }
        if status::cancelled() {
            return Err(StepError::Cancelled);
        }
        if price > 0 {
            match credits::charge(price, "image") {
                Ok(_) => {}
                Err(ChargeError::RunEnded) => return Err(StepError::Cancelled),
                Err(ChargeError::Insufficient(left)) => {
                    return Err(StepError::OutOfCredits(format!("an image costs {price} credits but only {left} remain")));
                }
                Err(ChargeError::InvalidAmount) => {
                    return Err(StepError::Internal(format!("the host refused a charge of {price}")));
                }
            }
        }
        status::report(Stage::Finishing, 1.0, &format!("{}x{} PNG, {price} credits", request.width, request.height));
        Ok(ImageResponse { bytes: fitted.png, mime_type: "image/png".into() })
    }
}

/// A PNG of the size the step asked for.
#[derive(Debug, PartialEq)]
struct Fitted {
    png: Vec<u8>,
    /// The size the server drew, when it was another one.
    drawn: Option<(u32, u32)>,
}

/// `png` as a PNG of `width` x `height`: itself when it has that size, else resized (nearest
/// neighbour). The error completes "the image from URL ...".
fn fit(png: Vec<u8>, width: u32, height: u32) -> Result<Fitted, String> {
    if !png.starts_with(&PNG_SIGNATURE) {
        return Err(format!("is not a PNG (it starts with {:02x?}); use a model that draws PNG", &png[..png.len().min(8)]));
    }
    let not_png = |e: png::DecodingError| format!("is not a readable PNG: {e}");
    let mut decoder = png::Decoder::new(Cursor::new(&png));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(not_png)?;
    let (from_width, from_height) = (reader.info().width, reader.info().height);
    if (from_width, from_height) == (width, height) {
        return Ok(Fitted { png, drawn: None });
    }
    let mut pixels = vec![0; reader.output_buffer_size().ok_or("is too large to decode")?];
    let frame = reader.next_frame(&mut pixels).map_err(not_png)?;
    let (color, _) = reader.output_color_type();
    let resized = resize(&pixels[..frame.buffer_size()], (from_width, from_height), color.samples(), (width, height));
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    let encoded = encoder.write_header().and_then(|mut writer| writer.write_image_data(&resized).and_then(|()| writer.finish()));
    encoded.map_err(|e| format!("could not be re-encoded at {width}x{height}: {e}"))?;
    Ok(Fitted { png: bytes, drawn: Some((from_width, from_height)) })
}

/// Nearest-neighbour resize of 8-bit `pixels` of `samples` bytes each.
fn resize(pixels: &[u8], (from_w, from_h): (u32, u32), samples: usize, (to_w, to_h): (u32, u32)) -> Vec<u8> {
    let mut out = Vec::with_capacity(to_w as usize * to_h as usize * samples);
    for y in 0..u64::from(to_h) {
        let row = (y * u64::from(from_h) / u64::from(to_h)) as usize * from_w as usize;
        for x in 0..u64::from(to_w) {
            let at = (row + (x * u64::from(from_w) / u64::from(to_w)) as usize) * samples;
            out.extend_from_slice(&pixels[at..at + samples]);
        }
    }
    out
}

genpipe_plugin_sdk::image::export!(OpenAiImage);

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, color: png::ColorType, pixels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(pixels).unwrap();
        writer.finish().unwrap();
        bytes
    }

    fn decode(png: &[u8]) -> (u32, u32, png::ColorType, Vec<u8>) {
        let mut reader = png::Decoder::new(Cursor::new(png)).read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut pixels).unwrap();
        pixels.truncate(frame.buffer_size());
        (frame.width, frame.height, frame.color_type, pixels)
    }

    #[test]
    fn a_png_of_the_right_size_is_kept_as_it_is() {
        let original = png(2, 1, png::ColorType::Rgb, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(fit(original.clone(), 2, 1).unwrap(), Fitted { png: original, drawn: None });
    }

    #[test]
    fn a_png_of_another_size_is_resized_nearest_neighbour() {
        let original = png(2, 2, png::ColorType::Grayscale, &[10, 20, 30, 40]);
        let fitted = fit(original, 4, 2).unwrap();
        assert_eq!(fitted.drawn, Some((2, 2)));
        let (w, h, color, pixels) = decode(&fitted.png);
        assert_eq!((w, h, color), (4, 2, png::ColorType::Grayscale));
        assert_eq!(pixels, [10, 10, 20, 20, 30, 30, 40, 40]);
        let rgba = png(4, 2, png::ColorType::Rgba, &(0..32).collect::<Vec<u8>>());
        let (w, h, _, pixels) = decode(&fit(rgba, 2, 1).unwrap().png);
        assert_eq!((w, h, pixels), (2, 1, vec![0, 1, 2, 3, 8, 9, 10, 11]));
    }

    #[test]
    fn what_is_not_a_png_is_refused_with_its_first_bytes() {
        let error = fit(b"\xff\xd8\xff\xe0JFIF".to_vec(), 1, 1).unwrap_err();
        assert_eq!(error, "is not a PNG (it starts with [ff, d8, ff, e0, 4a, 46, 49, 46]); use a model that draws PNG");
        let broken = [&PNG_SIGNATURE[..], b"garbage"].concat();
        assert!(fit(broken, 1, 1).unwrap_err().starts_with("is not a readable PNG"));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1024x768"), Some((1024, 768)));
        assert_eq!(parse_size("0x5"), None);
        assert_eq!(parse_size("big"), None);
    }
}
