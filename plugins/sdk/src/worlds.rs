//! One trait per world, and the macros that export a plugin implementing it.

use crate::StepError;
use crate::image::{ImageRequest, ImageResponse};
use crate::llm::{LlmRequest, LlmResponse};

/// A plugin of the `llm-step` world: prompt in, text out. Export it with [`crate::export_llm!`].
pub trait LlmPlugin {
    /// Generates text for `request`: stream chunks as they come ([`crate::TokenStream`] or
    /// [`crate::output::emit`]), charge for the work ([`crate::credits`]), report progress
    /// ([`crate::progress`]), and return the whole text.
    fn generate(request: LlmRequest) -> Result<LlmResponse, StepError>;
}

/// A plugin of the `image-step` world: prompt in, an encoded image out (a PNG of the requested
/// size). Export it with [`crate::export_image!`].
pub trait ImagePlugin {
    /// Renders an image for `request`.
    fn generate(request: ImageRequest) -> Result<ImageResponse, StepError>;
}

/// Exports an [`LlmPlugin`] as the component's `generate`.
#[macro_export]
macro_rules! export_llm {
    ($plugin:ty) => {
        #[doc(hidden)]
        struct GenpipeLlmExport;

        impl $crate::llm::Guest for GenpipeLlmExport {
            fn generate(request: $crate::llm::LlmRequest) -> Result<$crate::llm::LlmResponse, $crate::StepError> {
                <$plugin as $crate::LlmPlugin>::generate(request)
            }
        }

        $crate::llm::export!(GenpipeLlmExport);
    };
}

/// Exports an [`ImagePlugin`] as the component's `generate`.
#[macro_export]
macro_rules! export_image {
    ($plugin:ty) => {
        #[doc(hidden)]
        struct GenpipeImageExport;

        impl $crate::image::Guest for GenpipeImageExport {
            fn generate(request: $crate::image::ImageRequest) -> Result<$crate::image::ImageResponse, $crate::StepError> {
                <$plugin as $crate::ImagePlugin>::generate(request)
            }
        }

        $crate::image::export!(GenpipeImageExport);
    };
}
