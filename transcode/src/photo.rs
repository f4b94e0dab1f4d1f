//! The image pipeline: JPEG, PNG, WebP and GIF in; `standard`, `thumb` and an inline preview out.
//!
//! Decode once, shrinking on load where the codec can (libjpeg-turbo scales by 1/2, 1/4 or 1/8 inside
//! the IDCT, which is where libvips gets its speed), then downscale in a cascade — standard from the
//! decoded pixels, thumb from standard, preview from thumb — so the work is linear in the input and no
//! output needs its own full-resolution copy. An embedded RGB colour profile (Display P3 from
//! phones, Adobe RGB from cameras) is converted to sRGB with moxcms, since the outputs carry no
//! profile. EXIF orientation is applied to the pixels and every output is re-encoded by
//! libjpeg-turbo, which writes no metadata: no EXIF, GPS, XMP or ICC survives.

use std::io::{BufRead, Cursor, Seek};
use std::time::Instant;

use fast_image_resize as fr;
use image::metadata::Orientation;
use image::{DynamicImage, ImageFormat, RgbImage};
use turbojpeg::{Colorspace, Compressor, Decompressor, PixelFormat, ScalingFactor, Subsamp};
use types::BlobId;

use crate::TranscodeError;

/// The input formats the pipeline decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jpeg,
    Png,
    WebP,
    Gif,
}

impl Format {
    /// The format a declared `Content-Type` (without parameters) names, if the pipeline takes it.
    pub fn from_mime(mime: &str) -> Result<Self, TranscodeError> {
        match mime.to_ascii_lowercase().as_str() {
            "image/jpeg" | "image/jpg" => Ok(Format::Jpeg),
            "image/png" => Ok(Format::Png),
            "image/webp" => Ok(Format::WebP),
            "image/gif" => Ok(Format::Gif),
            "image/avif" | "image/heic" | "image/heif" => Err(TranscodeError::Unsupported(format!(
                "{mime} cannot be decoded by this server; send JPEG, PNG, WebP or GIF"
            ))),
            other => Err(TranscodeError::Unsupported(format!(
                "{other} is not an image type this server takes; send JPEG, PNG, WebP or GIF"
            ))),
        }
    }

    /// What the first bytes of a file say it is (magic numbers), whatever it was called.
    pub fn sniff(prefix: &[u8]) -> Option<Self> {
        match image::guess_format(prefix).ok()? {
            ImageFormat::Jpeg => Some(Format::Jpeg),
            ImageFormat::Png => Some(Format::Png),
            ImageFormat::WebP => Some(Format::WebP),
            ImageFormat::Gif => Some(Format::Gif),
            _ => None,
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::WebP => "image/webp",
            Format::Gif => "image/gif",
        }
    }

    fn image_format(self) -> ImageFormat {
        match self {
            Format::Jpeg => ImageFormat::Jpeg,
            Format::Png => ImageFormat::Png,
            Format::WebP => ImageFormat::WebP,
            Format::Gif => ImageFormat::Gif,
        }
    }
}

/// Output sizes and qualities.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// Long edge of `standard`, in pixels; smaller inputs are never upscaled.
    pub standard_edge: u32,
    pub thumb_edge: u32,
    pub preview_edge: u32,
    /// JPEG quality (1–100) of `standard` and `thumb`.
    pub quality: u8,
    /// The inline preview's JPEG must fit in this many bytes.
    pub preview_max_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self { standard_edge: 1600, thumb_edge: 320, preview_edge: 64, quality: 80, preview_max_bytes: 3 * 1024 }
    }
}

/// What one job may take.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Largest width × height accepted, checked from the header before any pixel is decoded.
    pub max_pixels: u64,
    /// Bytes the decoded pixels and working buffers may take.
    pub memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_pixels: 64_000_000, memory_bytes: 512 * 1024 * 1024 }
    }
}

impl Limits {
    pub fn check_pixels(&self, width: u32, height: u32) -> Result<(), TranscodeError> {
        if u64::from(width) * u64::from(height) > self.max_pixels {
            return Err(TranscodeError::TooManyPixels { width, height, max_pixels: self.max_pixels });
        }
        if width == 0 || height == 0 {
            return Err(TranscodeError::Corrupt(format!("the header says {width}×{height}")));
        }
        Ok(())
    }

    fn check_memory(&self, needed: u64) -> Result<(), TranscodeError> {
        if needed > self.memory_bytes {
            return Err(TranscodeError::OverMemoryBudget(format!(
                "decoding needs {needed} bytes, the budget is {}",
                self.memory_bytes
            )));
        }
        Ok(())
    }
}

/// What the header of a file says, read without decoding any pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub format: Format,
    pub width: u32,
    pub height: u32,
}

/// Reads the dimensions from the header alone, so a pixel bomb is refused before it is allocated.
pub fn probe(reader: impl BufRead + Seek, format: Format) -> Result<Probe, TranscodeError> {
    let (width, height) =
        image::ImageReader::with_format(reader, format.image_format()).into_dimensions().map_err(image_error)?;
    Ok(Probe { format, width, height })
}

/// One encoded output.
#[derive(Clone)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// BLAKE3 of `bytes`, computed here on the worker thread.
    pub blob: BlobId,
    pub width: u32,
    pub height: u32,
}

impl Encoded {
    pub const MIME: &'static str = "image/jpeg";

    fn new(bytes: Vec<u8>, width: u32, height: u32) -> Self {
        Self { blob: BlobId::of(&bytes), bytes, width, height }
    }

    pub fn dimensions(&self) -> Option<(u32, u32)> {
        Some((self.width, self.height))
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({}×{}, {} bytes, {})", self.width, self.height, self.bytes.len(), self.blob)
    }
}

/// Everything the pipeline makes of one image.
#[derive(Debug, Clone)]
pub struct Output {
    /// Size of the upright original (after EXIF orientation).
    pub width: u32,
    pub height: u32,
    pub standard: Encoded,
    pub thumb: Encoded,
    /// A tiny JPEG for a `data:` URL.
    pub preview: Vec<u8>,
}

/// 8-bit RGB pixels, rows packed.
struct Raster {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

/// Runs the whole pipeline on `bytes`. CPU-heavy: call it from a [`crate::Pool`] worker.
pub fn transcode(
    bytes: &[u8],
    format: Format,
    settings: &Settings,
    limits: &Limits,
    deadline: Instant,
) -> Result<Output, TranscodeError> {
    let (mut decoded, original_w, original_h) = match format {
        Format::Jpeg => decode_jpeg(bytes, settings.standard_edge, limits)?,
        _ => decode_with_image(bytes, format, limits)?,
    };
    if let Some(icc) = icc_profile(bytes, format) {
        to_srgb(&mut decoded, &icc);
    }
    in_time(deadline)?;

    // Sizes are computed from the original so that shrink-on-load's rounding never shows.
    let (sw, sh) = fit(original_w, original_h, settings.standard_edge);
    let mut resizer = fr::Resizer::new();
    let standard = resize(decoded, sw, sh, &mut resizer)?;
    in_time(deadline)?;
    let orientation = orientation(bytes);
    let standard = orient(standard, orientation);
    let (width, height) = match orientation {
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH => {
            (original_h, original_w)
        }
        _ => (original_w, original_h),
    };

    let (tw, th) = fit(standard.width, standard.height, settings.thumb_edge);
    let thumb = resize_from(&standard, tw, th, &mut resizer)?;
    let (pw, ph) = fit(thumb.width, thumb.height, settings.preview_edge);
    let preview = resize_from(&thumb, pw, ph, &mut resizer)?;
    in_time(deadline)?;

    let standard = Encoded::new(encode(&standard, settings.quality, true)?, standard.width, standard.height);
    in_time(deadline)?;
    let thumb = Encoded::new(encode(&thumb, settings.quality, true)?, thumb.width, thumb.height);
    let preview = encode_preview(&preview, settings.preview_max_bytes)?;
    Ok(Output { width, height, standard, thumb, preview })
}

fn in_time(deadline: Instant) -> Result<(), TranscodeError> {
    if Instant::now() > deadline { Err(TranscodeError::TimedOut) } else { Ok(()) }
}

/// The size that fits `(w, h)` into a `edge`×`edge` box, keeping the aspect ratio; never larger.
pub fn fit(w: u32, h: u32, edge: u32) -> (u32, u32) {
    let long = w.max(h);
    if long <= edge {
        return (w, h);
    }
    let scale = |x: u32| ((u64::from(x) * u64::from(edge) + u64::from(long) / 2) / u64::from(long)).max(1) as u32;
    (scale(w), scale(h))
}

/// Scans a JPEG may have. A progressive file needs a handful (libjpeg writes 10); each scan costs
/// a pass over every coefficient, so thousands of them turn a small file into minutes of CPU.
pub const MAX_JPEG_SCANS: usize = 100;

/// How many scans (SOS markers) a JPEG holds, walking its segments; `None` if the segment structure
/// is broken before the end (the decoder then reports the damage itself).
pub fn jpeg_scans(bytes: &[u8]) -> Option<usize> {
    let mut at = 2; // after SOI
    let mut scans = 0;
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xFF {
            return None;
        }
        let marker = bytes[at + 1];
        match marker {
            // Fill bytes, and markers without a length.
            0xFF => at += 1,
            0x01 | 0xD0..=0xD7 => at += 2,
            0xD9 => return Some(scans),
            _ => {
                let len = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
                at += 2 + len;
                if marker == 0xDA {
                    scans += 1;
                    // Entropy-coded data runs to the next marker that is neither a stuffed 0xFF00
                    // nor a restart marker.
                    while at + 1 < bytes.len()
                        && !(bytes[at] == 0xFF && bytes[at + 1] != 0 && !(0xD0..=0xD7).contains(&bytes[at + 1]))
                    {
                        at += 1;
                    }
                }
            }
        }
    }
    Some(scans)
}

fn decode_jpeg(bytes: &[u8], standard_edge: u32, limits: &Limits) -> Result<(Raster, u32, u32), TranscodeError> {
    let corrupt = |e: turbojpeg::Error| TranscodeError::Corrupt(e.to_string());
    if let Some(scans) = jpeg_scans(bytes)
        && scans > MAX_JPEG_SCANS
    {
        return Err(TranscodeError::OverLimit(format!("{scans} scans; at most {MAX_JPEG_SCANS} are taken")));
    }
    let mut decompressor = Decompressor::new().map_err(corrupt)?;
    let header = decompressor.read_header(bytes).map_err(corrupt)?;
    let (w, h) = (dimension(header.width)?, dimension(header.height)?);
    limits.check_pixels(w, h)?;

    // The smallest DCT scale whose result still covers the standard size; the resize does the rest.
    let long = header.width.max(header.height);
    let factor = if header.is_lossless || long <= standard_edge as usize {
        ScalingFactor::ONE
    } else {
        [ScalingFactor::ONE_EIGHTH, ScalingFactor::ONE_QUARTER, ScalingFactor::ONE_HALF]
            .into_iter()
            .find(|f| f.scale(long) >= standard_edge as usize)
            .unwrap_or(ScalingFactor::ONE)
    };
    decompressor.set_scaling_factor(factor).map_err(corrupt)?;
    let (dw, dh) = (factor.scale(header.width), factor.scale(header.height));

    // libjpeg-turbo cannot turn CMYK into RGB itself; those come out as CMYK and are converted here.
    let cmyk = matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK);
    let (format, channels) = if cmyk { (PixelFormat::CMYK, 4) } else { (PixelFormat::RGB, 3) };
    let pixels = (dw * dh) as u64;
    limits.check_memory(pixels * channels as u64 + if cmyk { pixels * 3 } else { 0 })?;
    let mut buf = vec![0u8; dw * dh * channels];
    let image = turbojpeg::Image { pixels: &mut buf[..], width: dw, pitch: dw * channels, height: dh, format };
    decompressor.decompress(bytes, image).map_err(corrupt)?;
    let rgb = if cmyk { cmyk_to_rgb(&buf) } else { buf };
    Ok((Raster { width: dimension(dw)?, height: dimension(dh)?, rgb }, w, h))
}

fn dimension(x: usize) -> Result<u32, TranscodeError> {
    u32::try_from(x).map_err(|_| TranscodeError::Corrupt(format!("dimension {x} is out of range")))
}

/// Naive CMYK to RGB for Adobe-style (inverted) CMYK JPEGs, as Photoshop and nearly every other
/// writer makes them. Without the embedded ICC profile colours shift a little, which is what
/// browsers without colour management show as well.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let k = u16::from(px[3]);
        for &c in &px[..3] {
            rgb.push(((u16::from(c) * k + 127) / 255) as u8);
        }
    }
    rgb
}

fn decode_with_image(bytes: &[u8], format: Format, limits: &Limits) -> Result<(Raster, u32, u32), TranscodeError> {
    use image::ImageDecoder;
    // One read of the header gives the size and the pixel layout.
    let header = image::ImageReader::with_format(Cursor::new(bytes), format.image_format())
        .into_decoder()
        .map_err(image_error)?;
    let ((width, height), color) = (header.dimensions(), header.color_type());
    limits.check_pixels(width, height)?;
    // Every copy the pipeline makes counts: the decoded pixels in their own layout, the 8-bit RGBA
    // a 16-bit or alpha image is turned into, and the RGB that goes on.
    let pixels = u64::from(width) * u64::from(height);
    let converted = if color.has_alpha() || color.bytes_per_pixel() > 4 { 4 + 3 } else { 3 };
    limits.check_memory(pixels * (u64::from(color.bytes_per_pixel()) + converted))?;
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format.image_format());
    let mut image_limits = image::Limits::default();
    image_limits.max_alloc = Some(limits.memory_bytes);
    reader.limits(image_limits);
    // GIF decodes to its first frame.
    let image = reader.decode().map_err(image_error)?;
    let (w, h) = (image.width(), image.height());
    let rgb = flatten(image);
    Ok((Raster { width: w, height: h, rgb }, w, h))
}

/// 8-bit RGB of any decoded image: 16-bit channels are scaled down and alpha is composed onto white,
/// since JPEG has no transparency and chat bubbles are light.
fn flatten(image: DynamicImage) -> Vec<u8> {
    if !image.color().has_alpha() {
        return image.into_rgb8().into_raw();
    }
    let rgba = image.into_rgba8().into_raw();
    let mut rgb = Vec::with_capacity(rgba.len() / 4 * 3);
    for px in rgba.chunks_exact(4) {
        let a = u16::from(px[3]);
        for &c in &px[..3] {
            rgb.push(((u16::from(c) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    rgb
}

fn image_error(e: image::ImageError) -> TranscodeError {
    match e {
        image::ImageError::Limits(l) => TranscodeError::OverMemoryBudget(l.to_string()),
        image::ImageError::Unsupported(u) => TranscodeError::Unsupported(u.to_string()),
        other => TranscodeError::Corrupt(other.to_string()),
    }
}

/// The embedded ICC profile, read from the headers alone.
fn icc_profile(bytes: &[u8], format: Format) -> Option<Vec<u8>> {
    use image::ImageDecoder;
    let cursor = Cursor::new(bytes);
    let profile = match format {
        Format::Jpeg => image::codecs::jpeg::JpegDecoder::new(cursor).ok()?.icc_profile(),
        Format::Png => image::codecs::png::PngDecoder::new(cursor).ok()?.icc_profile(),
        Format::WebP => image::codecs::webp::WebPDecoder::new(cursor).ok()?.icc_profile(),
        Format::Gif => return None,
    };
    profile.ok().flatten()
}

/// Converts pixels described by an RGB `icc` profile to sRGB in place. A profile that does not
/// parse, or is not RGB (grey, or CMYK, whose pixels were already turned into RGB), leaves the
/// pixels as they are: shown as sRGB, which is what a browser without colour management does too.
fn to_srgb(raster: &mut Raster, icc: &[u8]) {
    let Ok(source) = moxcms::ColorProfile::new_from_slice(icc) else { return };
    if source.color_space != moxcms::DataColorSpace::Rgb {
        return;
    }
    let srgb = moxcms::ColorProfile::new_srgb();
    let layout = moxcms::Layout::Rgb;
    let Ok(transform) = source.create_transform_8bit(layout, &srgb, layout, moxcms::TransformOptions::default()) else {
        return;
    };
    let mut converted = vec![0u8; raster.rgb.len()];
    if transform.transform(&raster.rgb, &mut converted).is_ok() {
        raster.rgb = converted;
    }
}

/// The EXIF orientation of the file, or upright when it has none (or none that parses).
pub fn orientation(bytes: &[u8]) -> Orientation {
    let Ok(exif) = exif::Reader::new().read_from_container(&mut Cursor::new(bytes)) else {
        return Orientation::NoTransforms;
    };
    exif.get_field(exif::Tag::Orientation, exif::In::PRIMARY)
        .and_then(|f| f.value.get_uint(0))
        .and_then(|v| u8::try_from(v).ok())
        .and_then(Orientation::from_exif)
        .unwrap_or(Orientation::NoTransforms)
}

fn orient(raster: Raster, orientation: Orientation) -> Raster {
    if orientation == Orientation::NoTransforms {
        return raster;
    }
    let buffer = RgbImage::from_raw(raster.width, raster.height, raster.rgb).expect("raster size matches its buffer");
    let mut image = DynamicImage::ImageRgb8(buffer);
    image.apply_orientation(orientation);
    let (width, height) = (image.width(), image.height());
    Raster { width, height, rgb: image.into_rgb8().into_raw() }
}

fn resize(src: Raster, w: u32, h: u32, resizer: &mut fr::Resizer) -> Result<Raster, TranscodeError> {
    if (src.width, src.height) == (w, h) {
        return Ok(src);
    }
    resize_from(&src, w, h, resizer)
}

fn resize_from(src: &Raster, w: u32, h: u32, resizer: &mut fr::Resizer) -> Result<Raster, TranscodeError> {
    let internal = |e: &dyn std::fmt::Display| TranscodeError::Corrupt(format!("resize: {e}"));
    if (src.width, src.height) == (w, h) {
        return Ok(Raster { width: w, height: h, rgb: src.rgb.clone() });
    }
    let from =
        fr::images::ImageRef::new(src.width, src.height, &src.rgb, fr::PixelType::U8x3).map_err(|e| internal(&e))?;
    let mut to = fr::images::Image::new(w, h, fr::PixelType::U8x3);
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3));
    resizer.resize(&from, &mut to, &options).map_err(|e| internal(&e))?;
    Ok(Raster { width: w, height: h, rgb: to.into_vec() })
}

fn encode_with(raster: &Raster, quality: u8, progressive: bool) -> Result<Vec<u8>, turbojpeg::Error> {
    let mut compressor = Compressor::new()?;
    compressor.set_quality(i32::from(quality))?;
    compressor.set_subsamp(Subsamp::Sub2x2)?;
    compressor.set_progressive(progressive)?;
    let image = turbojpeg::Image {
        pixels: &raster.rgb[..],
        width: raster.width as usize,
        pitch: raster.width as usize * 3,
        height: raster.height as usize,
        format: PixelFormat::RGB,
    };
    compressor.compress_to_vec(image)
}

fn encode(raster: &Raster, quality: u8, progressive: bool) -> Result<Vec<u8>, TranscodeError> {
    encode_with(raster, quality, progressive).map_err(|e| TranscodeError::Corrupt(format!("encode: {e}")))
}

/// The best quality whose preview still fits in `max_bytes`.
fn encode_preview(raster: &Raster, max_bytes: usize) -> Result<Vec<u8>, TranscodeError> {
    let mut last = Vec::new();
    for quality in [70, 60, 50, 40, 30, 20, 10] {
        last = encode(raster, quality, false)?;
        if last.len() <= max_bytes {
            return Ok(last);
        }
    }
    Err(TranscodeError::Corrupt(format!("the preview needs {} bytes even at the lowest quality", last.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_never_upscales_and_keeps_aspect() {
        assert_eq!(fit(4000, 3000, 1600), (1600, 1200));
        assert_eq!(fit(3000, 4000, 1600), (1200, 1600));
        assert_eq!(fit(800, 600, 1600), (800, 600));
        assert_eq!(fit(10000, 1, 320), (320, 1));
        assert_eq!(fit(451, 300, 64), (64, 43));
    }

    #[test]
    fn scans_are_counted_by_walking_segments() {
        // SOI, a DQT-like segment holding FF DA bytes, two scans with stuffed and restart bytes, EOI.
        let jpeg = [
            &[0xFF, 0xD8][..],
            &[0xFF, 0xDB, 0x00, 0x06, 0xFF, 0xDA, 0xFF, 0xDA],
            &[0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56],
            &[0xFF, 0xDA, 0x00, 0x02, 0x78],
            &[0xFF, 0xD9],
        ]
        .concat();
        assert_eq!(jpeg_scans(&jpeg), Some(2));
        assert_eq!(jpeg_scans(&[0xFF, 0xD8, 0x12, 0x34, 0x56, 0x78]), None);
    }

    #[test]
    fn declared_types_map_to_formats() {
        assert_eq!(Format::from_mime("image/JPEG"), Ok(Format::Jpeg));
        assert!(matches!(Format::from_mime("image/avif"), Err(TranscodeError::Unsupported(_))));
        assert!(matches!(Format::from_mime("text/html"), Err(TranscodeError::Unsupported(_))));
        assert_eq!(Format::sniff(b"\x89PNG\r\n\x1a\n0000"), Some(Format::Png));
        assert_eq!(Format::sniff(b"<html>"), None);
    }
}
