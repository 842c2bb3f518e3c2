//! An `image-step` plugin that paints a procedural landscape (sky, sun or moon, hills) whose
//! palette and shapes come from the prompt and the seed, and returns it as an RGB8 PNG.
//!
//! It charges `ceil(width * height * credits_per_megapixel / 1e6)` credits (config, default 10;
//! at least 1) once before rendering, and reports progress through `status` every eighth of the
//! rows, stopping there if the run was cancelled.

mod render;

use genpipe_plugin_sdk::credits::ChargeError;
use genpipe_plugin_sdk::image::{Guest, ImageRequest, ImageResponse};
use genpipe_plugin_sdk::status::{self, Stage};
use genpipe_plugin_sdk::{StepError, config, credits};
use render::{Scene, encode_png};

const MAX_SIDE: u32 = 4096;

struct ProceduralImage;

impl Guest for ProceduralImage {
    fn generate(request: ImageRequest) -> Result<ImageResponse, StepError> {
        status::report(Stage::Preparing, 0.0, "checking the request");
        let (width, height) = (request.width, request.height);
        for (name, value) in [("width", width), ("height", height)] {
            if !(1..=MAX_SIDE).contains(&value) {
                return Err(StepError::InvalidInput(format!("{name} must be between 1 and {MAX_SIDE}, got {value}")));
            }
        }
        let price: u64 = match config::get("credits_per_megapixel") {
            None => 10,
            Some(value) => value
                .trim()
                .parse()
                .map_err(|e| StepError::InvalidInput(format!("config `credits_per_megapixel` = '{value}' is not usable: {e}")))?,
        };
        let pixels = u128::from(width) * u128::from(height);
        let cost = u64::try_from((pixels * u128::from(price)).div_ceil(1_000_000)).unwrap_or(u64::MAX).max(1);
        match credits::charge(cost, "megapixel") {
            Ok(_) => {}
            Err(ChargeError::Insufficient(left)) => {
                return Err(StepError::OutOfCredits(format!(
                    "a {width}x{height} image costs {cost} credits ({price} per megapixel) but only {left} remain"
                )));
            }
            Err(ChargeError::RunEnded) => return Err(StepError::Cancelled),
            Err(ChargeError::InvalidAmount) => {
                return Err(StepError::Internal(format!("the host refused a charge of {cost}")));
            }
        }

        let rgb = Scene::new(&request.prompt, request.seed).render(width, height, |rows| {
            let message = format!("rendered {rows} of {height} rows");
            status::report(Stage::Generating, rows as f32 / height as f32, &message);
            if status::cancelled() { Err(StepError::Cancelled) } else { Ok(()) }
        })?;
        status::report(Stage::Finishing, 1.0, "encoding the PNG");
        let bytes = encode_png(width, height, &rgb).map_err(|e| StepError::Internal(format!("PNG encoding failed: {e}")))?;
        Ok(ImageResponse { bytes, mime_type: "image/png".to_string() })
    }
}

genpipe_plugin_sdk::image::export!(ProceduralImage);
