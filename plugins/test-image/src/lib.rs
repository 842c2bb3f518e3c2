//! A test plugin for the `image-step` world. It returns a flat grey PNG of the requested size
//! at once, stored without compression and touching no host function (the no-op plugin of the
//! benchmarks). With the param
//! `behaviour = "bad-output"` it returns bytes that are not a PNG, and with `"fail"` an error.

use genpipe_plugin_sdk::image::{Guest, ImageRequest, ImageResponse};
use genpipe_plugin_sdk::{StepError, param};

struct TestImage;

impl Guest for TestImage {
    fn generate(request: ImageRequest) -> Result<ImageResponse, StepError> {
        let mime_type = "image/png".to_string();
        match param(&request.params, "behaviour").unwrap_or("flat") {
            "flat" => {}
            "bad-output" => return Ok(ImageResponse { bytes: b"not a png".to_vec(), mime_type }),
            "fail" => return Err(StepError::Internal("test-image failed on purpose".into())),
            other => return Err(StepError::InvalidInput(format!("unknown behaviour '{other}'"))),
        }
        let pixels = vec![128u8; (request.width * request.height) as usize];
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, request.width, request.height);
        encoder.set_color(png::ColorType::Grayscale);
        // Stored blocks: no compressor state to allocate and fill, so the step costs next to nothing.
        encoder.set_deflate_compression(png::DeflateCompression::NoCompression);
        let mut writer = encoder.write_header().map_err(|e| StepError::Internal(e.to_string()))?;
        writer.write_image_data(&pixels).map_err(|e| StepError::Internal(e.to_string()))?;
        writer.finish().map_err(|e| StepError::Internal(e.to_string()))?;
        Ok(ImageResponse { bytes, mime_type })
    }
}

genpipe_plugin_sdk::image::export!(TestImage);
