//! Procedural landscape rendering, free of host calls: a sky gradient with value-noise clouds (or
//! stars), a sun or moon disc with a glow, and three to five ridges of multi-octave value-noise
//! hills fading into the haze, all chosen by a generator seeded from the prompt and the seed.
//! Words of the prompt pick the palette ("night", "sea", "forest", "fire", "snow" and kin); other
//! prompts get one built around a random hue.

use genpipe_plugin_sdk::{SplitMix64, hash_text};

type Colour = [f32; 3];

/// A palette for prompts that mention one of `keywords` (as a word or a word's start); the first
/// theme that matches wins.
struct Theme {
    keywords: &'static [&'static str],
    /// Sky top, horizon, sun or moon, far hills, near hills, as `0xRRGGBB`.
    colours: [u32; 5],
    stars: bool,
    relief: f32,
}

const THEMES: [Theme; 5] = [
    Theme {
        keywords: &["night", "moon", "star", "dark", "midnight", "dream"],
        colours: [0x0b1030, 0x34407a, 0xf2efd6, 0x1d2650, 0x0b1124],
        stars: true,
        relief: 1.0,
    },
    Theme {
        keywords: &["sea", "ocean", "water", "wave", "beach", "lake", "river", "pool", "tear"],
        colours: [0x3b8ad2, 0xc4e8f6, 0xfff3c4, 0x2f74a8, 0x10436c],
        stars: false,
        relief: 0.25,
    },
    Theme {
        keywords: &["forest", "tree", "wood", "green", "garden", "leaf", "leaves", "jungle"],
        colours: [0x69acd6, 0xe4f2d2, 0xfff0a8, 0x4f8350, 0x1c4722],
        stars: false,
        relief: 1.0,
    },
    Theme {
        keywords: &["fire", "flame", "sunset", "lava", "volcano", "desert", "burn", "red"],
        colours: [0x4e0f33, 0xff9a3c, 0xffe27a, 0x8c2f2c, 0x33101e],
        stars: false,
        relief: 1.2,
    },
    Theme {
        keywords: &["snow", "winter", "ice", "frost", "cold", "mountain", "white"],
        colours: [0x86b0d6, 0xeef4fa, 0xfffbea, 0xa9bdd6, 0xf2f6fb],
        stars: false,
        relief: 1.8,
    },
];

/// One ridge of hills: its mean height and swing (fractions of the image height) and its noise.
struct Ridge {
    base: f32,
    amplitude: f32,
    frequency: f32,
    seed: u32,
}

/// Everything the picture depends on, derived from the prompt and the seed.
pub struct Scene {
    sky_top: Colour,
    horizon: Colour,
    disc: Colour,
    far: Colour,
    near: Colour,
    stars: bool,
    cloud_cover: f32,
    /// Centre (fractions of width and height) and radius (fraction of the smaller side).
    sun: [f32; 3],
    /// Back to front.
    ridges: Vec<Ridge>,
    seed: u32,
}

impl Scene {
    pub fn new(prompt: &str, seed: u64) -> Self {
        let mut rng = SplitMix64::new(hash_text(prompt) ^ seed);
        let mut unit = || rng.next_f64() as f32;
        let lower = prompt.to_lowercase();
        let words = lower.split(|c: char| !c.is_alphanumeric());
        let theme = THEMES.iter().find(|t| words.clone().any(|w| t.keywords.iter().any(|k| w.starts_with(k))));
        let (colours, stars, relief) = match theme {
            Some(t) => (t.colours.map(hex), t.stars, t.relief),
            None => {
                let hue = unit();
                let c = |dh: f32, s, v| hsv(hue + dh, s, v);
                (
                    [c(0.0, 0.55, 0.75), c(0.08, 0.25, 0.97), c(0.5, 0.15, 1.0), c(0.42, 0.35, 0.55), c(0.47, 0.5, 0.28)],
                    false,
                    1.0,
                )
            }
        };
        let [sky_top, horizon, disc, far, near] = colours.map(|c| c.map(|v| (v + (unit() - 0.5) * 0.12).clamp(0.0, 1.0)));
        let sun = [0.15 + 0.7 * unit(), 0.12 + 0.28 * unit(), 0.05 + 0.06 * unit()];
        let count = 3 + (unit() * 3.0) as usize;
        let ridges = (0..count)
            .map(|i| {
                let depth = i as f32 / (count - 1) as f32;
                Ridge {
                    base: 0.5 + 0.3 * depth + 0.04 * unit(),
                    amplitude: relief * (0.22 - 0.12 * depth) * (0.6 + 0.8 * unit()),
                    frequency: 1.0 + 2.5 * unit() + 2.0 * depth,
                    seed: (unit() * 1e9) as u32,
                }
            })
            .collect();
        let cloud_cover = if stars { 0.0 } else { 0.3 + 0.5 * unit() };
        Self { sky_top, horizon, disc, far, near, stars, cloud_cover, sun, ridges, seed: (unit() * 1e9) as u32 }
    }

    /// Renders `width` x `height` RGB8 pixels, row by row, calling `progress` with the rows done
    /// every eighth of the picture (and after the last row); an error from it stops the render.
    pub fn render<E>(&self, width: u32, height: u32, mut progress: impl FnMut(u32) -> Result<(), E>) -> Result<Vec<u8>, E> {
        let (w, h) = (width as usize, height as usize);
        let (wf, hf) = (width as f32, height as f32);
        // Ridge heights in pixels, one row of `w` per ridge.
        let mut ridge_y = vec![0.0f32; self.ridges.len() * w];
        for (ridge, ys) in self.ridges.iter().zip(ridge_y.chunks_exact_mut(w)) {
            for (x, y) in ys.iter_mut().enumerate() {
                let u = x as f32 / hf * ridge.frequency;
                *y = hf * (ridge.base - ridge.amplitude * (fbm(ridge.seed, u, 0.5, 4) - 0.5) * 2.0);
            }
        }
        let [sun_x, sun_y, sun_r] = [self.sun[0] * wf, self.sun[1] * hf, self.sun[2] * wf.min(hf)];
        let sky_depth = 0.7 * hf;
        let last = self.ridges.len().saturating_sub(1).max(1) as f32;
        let step = height.div_ceil(8);
        let mut pixels = vec![0u8; w * h * 3];
        for (y, row) in pixels.chunks_exact_mut(w * 3).enumerate() {
            let yf = y as f32;
            let v = yf / hf;
            let sky = mix(self.sky_top, self.horizon, (yf / sky_depth).min(1.0).powf(0.8));
            for (x, px) in row.chunks_exact_mut(3).enumerate() {
                let u = x as f32 / hf;
                let layer = (0..self.ridges.len()).rev().find(|&k| yf >= ridge_y[k * w + x]);
                let colour = match layer {
                    Some(k) => {
                        let depth = k as f32 / last;
                        let below = (yf - ridge_y[k * w + x]) / hf;
                        let base = mix(mix(self.far, self.near, depth), self.horizon, 0.35 * (1.0 - depth));
                        let grain = 0.85 + 0.3 * fbm(self.seed ^ k as u32, u * 9.0, v * 9.0, 2);
                        scale(base, grain * (1.0 - (below * 0.9).min(0.35)))
                    }
                    None => self.sky(sky, u, v, x, y, [x as f32 - sun_x, yf - sun_y, sun_r]),
                };
                for (out, c) in px.iter_mut().zip(colour) {
                    *out = (c.clamp(0.0, 1.0) * 255.0 + 0.5) as u8;
                }
            }
            let done = y as u32 + 1;
            if done.is_multiple_of(step) || done == height {
                progress(done)?;
            }
        }
        Ok(pixels)
    }

    /// The sky at a pixel: the gradient `base`, clouds or stars, and the disc with its glow;
    /// `sun` is the offset from the disc's centre and its radius, in pixels.
    fn sky(&self, base: Colour, u: f32, v: f32, x: usize, y: usize, sun: [f32; 3]) -> Colour {
        let mut colour = base;
        if self.stars {
            let twinkle = hash(self.seed, x as i32, y as i32);
            if twinkle > 0.996 {
                colour = mix(colour, [1.0; 3], (twinkle - 0.996) * 250.0 * (1.0 - v));
            }
        } else {
            let cloud = fbm(self.seed, u * 2.5, v * 7.0, 4);
            let amount = ((cloud - 1.0 + self.cloud_cover) * 2.5).clamp(0.0, 0.85) * (1.0 - v);
            colour = mix(colour, mix(self.horizon, [1.0; 3], 0.7), amount);
        }
        let d = (sun[0] * sun[0] + sun[1] * sun[1]).sqrt() / sun[2].max(1.0);
        if d <= 1.0 {
            self.disc
        } else {
            let glow = 0.6 / (1.0 + (d - 1.0) * (d - 1.0) * 6.0);
            mix(colour, self.disc, glow)
        }
    }
}

/// Encodes RGB8 `pixels` as a PNG.
pub fn encode_png(width: u32, height: u32, pixels: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(bytes)
}

fn hex(rgb: u32) -> Colour {
    [16, 8, 0].map(|shift| ((rgb >> shift) & 0xff) as f32 / 255.0)
}

fn hsv(hue: f32, saturation: f32, value: f32) -> Colour {
    let h = hue.rem_euclid(1.0) * 6.0;
    let f = |n: f32| {
        let k = (n + h) % 6.0;
        value - value * saturation * k.min(4.0 - k).clamp(0.0, 1.0)
    };
    [f(5.0), f(3.0), f(1.0)]
}

fn mix(a: Colour, b: Colour, t: f32) -> Colour {
    [0, 1, 2].map(|i| a[i] + (b[i] - a[i]) * t)
}

fn scale(c: Colour, k: f32) -> Colour {
    c.map(|v| v * k)
}

/// A well-mixed value in `[0, 1)` for a lattice point.
fn hash(seed: u32, x: i32, y: i32) -> f32 {
    let mut h = seed ^ (x as u32).wrapping_mul(0x27d4_eb2d) ^ (y as u32).wrapping_mul(0x1656_67b1);
    h = (h ^ (h >> 15)).wrapping_mul(0x2c1b_3c6d);
    h = (h ^ (h >> 12)).wrapping_mul(0x297a_2d39);
    h ^= h >> 15;
    (h >> 8) as f32 / (1 << 24) as f32
}

/// Smoothly interpolated value noise in `[0, 1)`.
fn noise(seed: u32, x: f32, y: f32) -> f32 {
    let (x0, y0) = (x.floor(), y.floor());
    let smooth = |t: f32| t * t * (3.0 - 2.0 * t);
    let (sx, sy) = (smooth(x - x0), smooth(y - y0));
    let (ix, iy) = (x0 as i32, y0 as i32);
    let top = hash(seed, ix, iy) + (hash(seed, ix + 1, iy) - hash(seed, ix, iy)) * sx;
    let bottom = hash(seed, ix, iy + 1) + (hash(seed, ix + 1, iy + 1) - hash(seed, ix, iy + 1)) * sx;
    top + (bottom - top) * sy
}

/// `octaves` of value noise, each twice as fine and half as strong, normalised to `[0, 1)`.
fn fbm(seed: u32, x: f32, y: f32, octaves: u32) -> f32 {
    let (mut sum, mut norm, mut amplitude, mut frequency) = (0.0, 0.0, 1.0, 1.0);
    for octave in 0..octaves {
        sum += amplitude * noise(seed.wrapping_add(octave), x * frequency, y * frequency);
        norm += amplitude;
        amplitude *= 0.5;
        frequency *= 2.0;
    }
    sum / norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn pixels(prompt: &str, seed: u64, width: u32, height: u32) -> Vec<u8> {
        Scene::new(prompt, seed).render(width, height, |_| Ok::<_, Infallible>(())).unwrap()
    }

    #[test]
    fn encodes_a_png_of_exactly_the_requested_size() {
        for (width, height) in [(1, 1), (64, 48), (7, 131), (300, 2)] {
            let rgb = pixels("a lighthouse by the sea", 3, width, height);
            assert_eq!(rgb.len(), (width * height * 3) as usize);
            let png = encode_png(width, height, &rgb).unwrap();
            let mut reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
            let mut decoded = vec![0; reader.output_buffer_size().unwrap()];
            let info = reader.next_frame(&mut decoded).unwrap();
            assert_eq!((info.width, info.height, info.color_type), (width, height, png::ColorType::Rgb));
            assert_eq!(decoded, rgb);
        }
    }

    #[test]
    fn same_prompt_and_seed_give_the_same_picture() {
        assert_eq!(pixels("snowy mountains at dawn", 42, 80, 60), pixels("snowy mountains at dawn", 42, 80, 60));
        assert_ne!(pixels("snowy mountains at dawn", 42, 80, 60), pixels("snowy mountains at dawn", 43, 80, 60));
    }

    #[test]
    fn different_prompts_give_different_pictures() {
        let prompts = ["a forest at night", "fire over the sea", "a forest by day", "Alice in Wonderland", ""];
        let pictures: Vec<_> = prompts.iter().map(|p| pixels(p, 1, 64, 48)).collect();
        for (i, a) in pictures.iter().enumerate() {
            for b in &pictures[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn pictures_are_not_flat() {
        for prompt in THEMES.iter().map(|t| t.keywords[0]).chain(["a cat", "x"]) {
            let rgb = pixels(prompt, 9, 96, 64);
            let mut colours: Vec<_> = rgb.chunks_exact(3).collect();
            colours.sort_unstable();
            colours.dedup();
            assert!(colours.len() > 200, "{prompt}: only {} colours", colours.len());
        }
    }

    #[test]
    fn reports_progress_every_eighth_and_stops_on_error() {
        let mut reports = Vec::new();
        let record = |rows| {
            reports.push(rows);
            Ok::<_, Infallible>(())
        };
        Scene::new("p", 0).render(10, 100, record).unwrap();
        assert_eq!(reports, [13, 26, 39, 52, 65, 78, 91, 100]);
        assert_eq!(Scene::new("p", 0).render(10, 100, |rows| if rows > 30 { Err(rows) } else { Ok(()) }), Err(39));
    }
}
