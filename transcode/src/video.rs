//! The video pipeline: MP4/MOV/3GP and WebM/MKV in, a streamable H.264 + AAC MP4 and a poster out.
//!
//! libav does the work (ffmpeg-next over Debian's libav*), so this module runs only inside the
//! worker process ([`crate::worker`]) with a memory limit and kills at its deadline; the
//! server never opens a video itself. libav is held to what we mean it to read: the file we name
//! (protocol whitelist `file`), the MP4 and Matroska demuxers (format whitelist: no HLS, concat,
//! playlist or image-sequence demuxer is reachable), MP4 external data references off, and decoders
//! from an allow-list. The headers are checked against the limits before a frame is decoded.
//!
//! One pass: demux → decode (frame threads) → filter (display-matrix rotation, scale to ≤ 1280 px
//! with even sides, ≤ 30 fps, yuv420p) → libx264 (High, CRF) and, for sound, → 48 kHz → AAC → MP4
//! with the moov atom in front. A frame about a second in is kept as the poster, which then goes
//! through the image pipeline like any photo.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ff::codec::Id;
use ff::format::Pixel;
use ff::{Dictionary, Rational, Rescale, filter, frame, media};
use ffmpeg_next as ff;
use serde::{Deserialize, Serialize};
use types::BlobId;

use crate::TranscodeError;
use crate::photo;

/// Demuxers libav may use, by their libav names. Nothing else is reachable, whatever the bytes say.
const DEMUXERS: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm";
const VIDEO_CODECS: &[Id] = &[Id::H264, Id::HEVC, Id::VP8, Id::VP9, Id::AV1, Id::MPEG4, Id::H263];
const AUDIO_CODECS: &[Id] = &[
    Id::AAC,
    Id::MP3,
    Id::OPUS,
    Id::VORBIS,
    Id::AMR_NB,
    Id::AMR_WB,
    Id::FLAC,
    Id::ALAC,
    Id::AC3,
    Id::EAC3,
    Id::PCM_S16LE,
    Id::PCM_S16BE,
    Id::PCM_F32LE,
];
/// Decoders libav may open (`codec_whitelist`), by their libav names.
const DECODERS: &str = "h264,hevc,vp8,vp9,libvpx,libvpx-vp9,av1,libdav1d,libaom-av1,mpeg4,h263,aac,aac_fixed,mp3,mp3float,\
                        opus,libopus,vorbis,libvorbis,amrnb,amrwb,libopencore_amrnb,libopencore_amrwb,flac,alac,ac3,\
                        ac3_fixed,eac3,pcm_s16le,pcm_s16be,pcm_f32le";

/// The containers taken. The declared type picks one; the bytes must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    /// MP4, QuickTime MOV and 3GP: ISO base media files.
    Mp4,
    /// WebM and Matroska.
    Matroska,
}

/// Output settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Longest side of the output, in pixels; smaller inputs keep their size.
    pub max_edge: u32,
    pub max_fps: u32,
    /// libx264 constant rate factor: lower is better and larger.
    pub crf: u8,
    /// libx264 preset: ultrafast … veryslow.
    pub preset: String,
    /// AAC bitrate, bits per second.
    pub audio_bitrate: u32,
    /// Where in the video the poster is taken, in milliseconds (clips shorter than twice this use
    /// their first frame).
    pub poster_at_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_edge: 1280,
            max_fps: 30,
            crf: 23,
            preset: "veryfast".into(),
            audio_bitrate: 96_000,
            poster_at_ms: 1000,
        }
    }
}

/// What an upload may hold, checked from the headers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_duration_ms: u64,
    /// Width × height of a frame.
    pub max_pixels: u64,
    pub max_fps: u32,
    pub max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_duration_ms: 10 * 60 * 1000, max_pixels: 4096 * 2304, max_fps: 240, max_streams: 16 }
    }
}

/// A variant written to a file in the output folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileVariant {
    pub path: PathBuf,
    pub blob: BlobId,
    pub bytes: u64,
    pub width: u32,
    pub height: u32,
}

/// Everything the pipeline makes of one video.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Output {
    /// Size of the upright original.
    pub width: u32,
    pub height: u32,
    pub duration_ms: u64,
    pub has_audio: bool,
    /// The MP4.
    pub standard: FileVariant,
    /// JPEGs from the image pipeline.
    pub poster: FileVariant,
    pub thumb: FileVariant,
    pub preview: Vec<u8>,
}

impl Output {
    pub const MIME: &'static str = "video/mp4";
}

/// ENOMEM, as libav reports a failed allocation (the worker's address-space limit).
const ENOMEM: i32 = 12;

fn av(what: &'static str) -> impl Fn(ff::Error) -> TranscodeError {
    move |e| match e {
        ff::Error::Other { errno: ENOMEM } => TranscodeError::OverMemoryBudget(format!("{what}: {e}")),
        e => TranscodeError::Corrupt(format!("{what}: {e}")),
    }
}

/// What the headers say about the streams we would transcode.
struct Probed {
    input: ff::format::context::Input,
    video: usize,
    audio: Option<usize>,
    /// Degrees clockwise the picture must be turned to stand upright: 0, 90, 180 or 270.
    rotation: u32,
    duration_ms: u64,
}

fn open(path: &Path, limits: &Limits) -> Result<Probed, TranscodeError> {
    ff::init().map_err(|e| TranscodeError::Io(format!("libav did not start: {e}")))?;
    ff::log::set_level(ff::log::Level::Fatal);
    let mut options = Dictionary::new();
    options.set("protocol_whitelist", "file");
    options.set("format_whitelist", DEMUXERS);
    options.set("codec_whitelist", DECODERS);
    // MP4/MOV "data references" may name other files; never follow them.
    options.set("enable_drefs", "0");
    // The upload was sniffed as one of these containers, so one that does not open is damaged.
    let input = ff::format::input_with_dictionary(path, options)
        .map_err(|e| TranscodeError::Corrupt(format!("the container cannot be read: {e}")))?;
    if input.nb_streams() > limits.max_streams {
        return Err(TranscodeError::OverLimit(format!(
            "{} streams; at most {} are taken",
            input.nb_streams(),
            limits.max_streams
        )));
    }
    let video = input
        .streams()
        .best(media::Type::Video)
        .ok_or_else(|| TranscodeError::Corrupt("the file holds no video stream".into()))?;
    let params = video.parameters();
    if !VIDEO_CODECS.contains(&params.id()) {
        return Err(TranscodeError::Unsupported(format!("{:?} video is not taken", params.id())));
    }
    let decoder = ff::codec::context::Context::from_parameters(params).map_err(av("video parameters"))?;
    let decoder = decoder.decoder().video().map_err(av("video decoder"))?;
    let (w, h) = (decoder.width(), decoder.height());
    if w == 0 || h == 0 {
        return Err(TranscodeError::Corrupt("the video stream has no usable size".into()));
    }
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(TranscodeError::TooManyPixels { width: w, height: h, max_pixels: limits.max_pixels });
    }
    let fps = rate(video.avg_frame_rate()).or_else(|| rate(video.rate())).unwrap_or(0.0);
    if fps > f64::from(limits.max_fps) {
        return Err(TranscodeError::OverLimit(format!("{fps:.0} fps is over the limit of {} fps", limits.max_fps)));
    }
    let duration_ms = if input.duration() > 0 {
        input.duration().rescale((1, ff::ffi::AV_TIME_BASE), (1, 1000)) as u64
    } else if video.duration() > 0 {
        video.duration().rescale(video.time_base(), (1, 1000)) as u64
    } else {
        return Err(TranscodeError::Corrupt("the container does not say how long the video is".into()));
    };
    if duration_ms > limits.max_duration_ms {
        return Err(TranscodeError::TooLong { duration_ms, max_ms: limits.max_duration_ms });
    }
    let rotation = video
        .side_data()
        .find(|d| d.kind() == ff::codec::packet::side_data::Type::DisplayMatrix)
        .map_or(0, |d| rotation(d.data()));
    let video_index = video.index();
    let audio = match input.streams().best(media::Type::Audio) {
        Some(a) if AUDIO_CODECS.contains(&a.parameters().id()) => Some(a.index()),
        Some(a) => {
            return Err(TranscodeError::Unsupported(format!("{:?} audio is not taken", a.parameters().id())));
        }
        None => None,
    };
    Ok(Probed { video: video_index, audio, rotation, duration_ms, input })
}

fn rate(r: Rational) -> Option<f64> {
    (r.numerator() > 0 && r.denominator() > 0).then(|| f64::from(r.numerator()) / f64::from(r.denominator()))
}

/// The clockwise turn a display matrix asks for, as the ffmpeg CLI reads it, to the nearest right
/// angle. The matrix is nine 16.16 fixed-point numbers, row by row.
fn rotation(matrix: &[u8]) -> u32 {
    if matrix.len() < 36 {
        return 0;
    }
    let at = |i: usize| f64::from(i32::from_le_bytes(matrix[i * 4..i * 4 + 4].try_into().expect("4 bytes"))) / 65536.0;
    let (a, b, c, d) = (at(0), at(1), at(3), at(4));
    let (sx, sy) = (a.hypot(c), b.hypot(d));
    if sx == 0.0 || sy == 0.0 {
        return 0;
    }
    // av_display_rotation_get's counter-clockwise angle, negated.
    let clockwise = (b / sy).atan2(a / sx).to_degrees().rem_euclid(360.0);
    (((clockwise / 90.0).round() as u32) % 4) * 90
}

fn upright(w: u32, h: u32, rotation: u32) -> (u32, u32) {
    if rotation % 180 == 90 { (h, w) } else { (w, h) }
}

/// The output size: fits `max_edge`, never larger than the input, both sides even.
pub fn output_size(w: u32, h: u32, max_edge: u32) -> (u32, u32) {
    let (w, h) = photo::fit(w, h, max_edge);
    ((w & !1).max(2), (h & !1).max(2))
}

struct VideoLane {
    stream: usize,
    out: usize,
    decoder: ff::decoder::Video,
    graph: filter::Graph,
    encoder: ff::encoder::Video,
    encoder_tb: Rational,
}

struct AudioLane {
    stream: usize,
    out: usize,
    decoder: ff::decoder::Audio,
    graph: filter::Graph,
    encoder: ff::encoder::Audio,
    encoder_tb: Rational,
}

/// Transcodes `input` into `output_dir`, calling `progress` with 0.0–1.0 now and then.
/// CPU-heavy and unisolated: run it in a worker process ([`crate::worker`]).
pub fn transcode(
    input: &Path,
    output_dir: &Path,
    settings: &Settings,
    limits: &Limits,
    mut progress: impl FnMut(f32),
) -> Result<Output, TranscodeError> {
    let started = Instant::now();
    let Probed { mut input, video, audio, rotation, duration_ms } = open(input, limits)?;
    let mp4_path = output_dir.join("standard.mp4");
    let mut output = ff::format::output_as(&mp4_path, "mp4").map_err(|e| TranscodeError::Io(e.to_string()))?;
    let global_header = output.format().flags().contains(ff::format::Flags::GLOBAL_HEADER);

    let mut vlane = video_lane(&input, video, 0, rotation, settings, &mut output, global_header)?;
    let mut alane = match audio {
        Some(index) => Some(audio_lane(&input, index, 1, settings, &mut output, global_header)?),
        None => None,
    };
    let mut options = Dictionary::new();
    options.set("movflags", "+faststart");
    output.write_header_with(options).map_err(av("writing the MP4 header"))?;
    let out_tb: Vec<Rational> = output.streams().map(|s| s.time_base()).collect();

    let (in_w, in_h) = (vlane.decoder.width(), vlane.decoder.height());
    let poster_at = if duration_ms >= 2 * settings.poster_at_ms { settings.poster_at_ms } else { 0 };
    let mut poster: Option<frame::Video> = None;
    let mut last_report = Instant::now();
    let video_tb = input.stream(video).expect("found above").time_base();

    // Headers can lie: duration, frame count and frame rate are checked again on the packets
    // themselves, so a file that claims ten seconds and holds ten minutes stops at the limit.
    let max_frames = (limits.max_duration_ms / 1000 + 1) * u64::from(limits.max_fps);
    let mut frames = 0u64;
    for (stream, packet) in input.packets() {
        let at_ms = packet.pts().map_or(0, |pts| pts.rescale(stream.time_base(), (1, 1000)).max(0) as u64);
        if at_ms > limits.max_duration_ms.saturating_add(1000) {
            return Err(TranscodeError::TooLong { duration_ms: at_ms, max_ms: limits.max_duration_ms });
        }
        if stream.index() == vlane.stream {
            frames += 1;
            if frames > max_frames {
                return Err(TranscodeError::OverLimit(format!(
                    "more than {max_frames} frames: over {} fps for the duration allowed",
                    limits.max_fps
                )));
            }
            vlane.decoder.send_packet(&packet).map_err(av("decoding video"))?;
            vlane.drain(&mut output, &out_tb, &mut poster, poster_at)?;
            if let Some(pts) = packet.pts()
                && last_report.elapsed().as_millis() >= 500
            {
                let done = pts.rescale(video_tb, (1, 1000)) as f64 / duration_ms.max(1) as f64;
                progress(done.clamp(0.0, 0.99) as f32);
                last_report = Instant::now();
            }
        } else if let Some(lane) = alane.as_mut().filter(|l| l.stream == stream.index()) {
            lane.decoder.send_packet(&packet).map_err(av("decoding audio"))?;
            lane.drain(&mut output, &out_tb)?;
        }
    }
    vlane.decoder.send_eof().map_err(av("decoding video"))?;
    vlane.drain(&mut output, &out_tb, &mut poster, poster_at)?;
    vlane.graph.get("in").expect("made").source().flush().map_err(av("filtering video"))?;
    vlane.filtered(&mut output, &out_tb, &mut poster, poster_at)?;
    vlane.encoder.send_eof().map_err(av("encoding video"))?;
    vlane.packets(&mut output, &out_tb)?;
    if let Some(lane) = alane.as_mut() {
        lane.decoder.send_eof().map_err(av("decoding audio"))?;
        lane.drain(&mut output, &out_tb)?;
        lane.graph.get("in").expect("made").source().flush().map_err(av("filtering audio"))?;
        lane.filtered(&mut output, &out_tb)?;
        lane.encoder.send_eof().map_err(av("encoding audio"))?;
        lane.packets(&mut output, &out_tb)?;
    }
    output.write_trailer().map_err(av("finishing the MP4"))?;
    let (out_w, out_h) = (vlane.encoder.width(), vlane.encoder.height());
    drop(output);

    let poster = poster.ok_or_else(|| TranscodeError::Corrupt("the video has no frame we can decode".into()))?;
    let poster_jpeg = to_jpeg(&poster)?;
    let photo = photo::transcode(
        &poster_jpeg,
        photo::Format::Jpeg,
        &photo::Settings::default(),
        &photo::Limits::default(),
        Instant::now() + std::time::Duration::from_secs(60),
    )?;
    let poster = write_variant(output_dir, "poster.jpg", &photo.standard)?;
    let thumb = write_variant(output_dir, "thumb.jpg", &photo.thumb)?;
    let (width, height) = upright(in_w, in_h, rotation);
    let standard = FileVariant {
        blob: hash_file(&mp4_path)?,
        bytes: std::fs::metadata(&mp4_path).map_err(|e| TranscodeError::Io(e.to_string()))?.len(),
        path: mp4_path,
        width: out_w,
        height: out_h,
    };
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "video transcoded");
    progress(1.0);
    Ok(Output {
        width,
        height,
        duration_ms,
        has_audio: alane.is_some(),
        standard,
        poster,
        thumb,
        preview: photo.preview,
    })
}

fn video_lane(
    input: &ff::format::context::Input,
    index: usize,
    out: usize,
    rotation: u32,
    settings: &Settings,
    output: &mut ff::format::context::Output,
    global_header: bool,
) -> Result<VideoLane, TranscodeError> {
    let stream = input.stream(index).expect("found by probe");
    let mut context =
        ff::codec::context::Context::from_parameters(stream.parameters()).map_err(av("video parameters"))?;
    context.set_threading(ff::threading::Config { kind: ff::threading::Type::Frame, count: 0, ..Default::default() });
    let decoder = context.decoder().video().map_err(av("video decoder"))?;

    let (uw, uh) = upright(decoder.width(), decoder.height(), rotation);
    let (w, h) = output_size(uw, uh, settings.max_edge);
    let in_fps = rate(stream.avg_frame_rate()).unwrap_or(f64::from(settings.max_fps));
    let turn = match rotation {
        90 => "transpose=clock,",
        180 => "hflip,vflip,",
        270 => "transpose=cclock,",
        _ => "",
    };
    let fps =
        if in_fps > f64::from(settings.max_fps) + 0.01 { format!("fps={},", settings.max_fps) } else { String::new() };
    let spec = format!("{turn}scale={w}:{h}:flags=bicubic,setsar=1,{fps}format=yuv420p");
    let tb = stream.time_base();
    let aspect = decoder.aspect_ratio();
    let args = format!(
        "video_size={}x{}:pix_fmt={}:time_base={}/{}:pixel_aspect={}/{}",
        decoder.width(),
        decoder.height(),
        decoder.format().descriptor().map_or("yuv420p", |d| d.name()),
        tb.numerator(),
        tb.denominator(),
        aspect.numerator().max(1),
        aspect.denominator().max(1),
    );
    let mut graph = filter::Graph::new();
    let failed = av("building the video filter");
    graph.add(&filter::find("buffer").expect("libavfilter has buffer"), "in", &args).map_err(&failed)?;
    graph.add(&filter::find("buffersink").expect("libavfilter has buffersink"), "out", "").map_err(&failed)?;
    graph.output("in", 0).and_then(|p| p.input("out", 0)).and_then(|p| p.parse(&spec)).map_err(&failed)?;
    graph.validate().map_err(&failed)?;
    let sink_tb = graph.get("out").expect("made").sink().time_base();
    let out_fps = if fps.is_empty() { stream.avg_frame_rate() } else { Rational(settings.max_fps as i32, 1) };

    let codec = ff::encoder::find_by_name("libx264")
        .ok_or_else(|| TranscodeError::Io("this libavcodec has no libx264 encoder".into()))?;
    let mut ost = output.add_stream(codec).map_err(av("adding the video stream"))?;
    let mut encoder =
        ff::codec::context::Context::new_with_codec(codec).encoder().video().map_err(av("video encoder"))?;
    encoder.set_width(w);
    encoder.set_height(h);
    encoder.set_format(Pixel::YUV420P);
    encoder.set_aspect_ratio(Rational(1, 1));
    encoder.set_time_base(sink_tb);
    if out_fps.numerator() > 0 {
        encoder.set_frame_rate(Some(out_fps));
    }
    if global_header {
        encoder.set_flags(ff::codec::Flags::GLOBAL_HEADER);
    }
    let mut x264 = Dictionary::new();
    x264.set("preset", &settings.preset);
    x264.set("crf", &settings.crf.to_string());
    x264.set("profile", "high");
    let encoder = encoder.open_as_with(codec, x264).map_err(av("opening libx264"))?;
    ost.set_parameters(&encoder);
    ost.set_time_base(sink_tb);
    Ok(VideoLane { stream: index, out, decoder, graph, encoder, encoder_tb: sink_tb })
}

impl VideoLane {
    fn drain(
        &mut self,
        output: &mut ff::format::context::Output,
        out_tb: &[Rational],
        poster: &mut Option<frame::Video>,
        poster_at: u64,
    ) -> Result<(), TranscodeError> {
        let mut decoded = frame::Video::empty();
        while self.decoder.receive_frame(&mut decoded).is_ok() {
            let timestamp = decoded.timestamp();
            decoded.set_pts(timestamp);
            self.graph.get("in").expect("made").source().add(&decoded).map_err(av("filtering video"))?;
            self.filtered(output, out_tb, poster, poster_at)?;
        }
        Ok(())
    }

    fn filtered(
        &mut self,
        output: &mut ff::format::context::Output,
        out_tb: &[Rational],
        poster: &mut Option<frame::Video>,
        poster_at: u64,
    ) -> Result<(), TranscodeError> {
        let mut filtered = frame::Video::empty();
        while self.graph.get("out").expect("made").sink().frame(&mut filtered).is_ok() {
            let at_ms = filtered.pts().map_or(0, |p| p.max(0).rescale(self.encoder_tb, (1, 1000)) as u64);
            // The first frame, replaced by the first at or after the poster time.
            let wanted = match poster {
                None => true,
                Some(p) => {
                    let p_ms = p.pts().map_or(0, |x| x.max(0).rescale(self.encoder_tb, (1, 1000)) as u64);
                    p_ms < poster_at && at_ms >= poster_at
                }
            };
            if wanted {
                *poster = Some(filtered.clone());
            }
            self.encoder.send_frame(&filtered).map_err(av("encoding video"))?;
            self.packets(output, out_tb)?;
        }
        Ok(())
    }

    fn packets(&mut self, output: &mut ff::format::context::Output, out_tb: &[Rational]) -> Result<(), TranscodeError> {
        mux(&mut self.encoder, self.out, self.encoder_tb, output, out_tb)
    }
}

fn audio_lane(
    input: &ff::format::context::Input,
    index: usize,
    out: usize,
    settings: &Settings,
    output: &mut ff::format::context::Output,
    global_header: bool,
) -> Result<AudioLane, TranscodeError> {
    let stream = input.stream(index).expect("found by probe");
    let context = ff::codec::context::Context::from_parameters(stream.parameters()).map_err(av("audio parameters"))?;
    let decoder = context.decoder().audio().map_err(av("audio decoder"))?;
    let channels = if decoder.channels() == 1 { ff::ChannelLayout::MONO } else { ff::ChannelLayout::STEREO };
    let in_layout = if decoder.channel_layout().bits() == 0 {
        ff::ChannelLayout::default(i32::from(decoder.channels().max(1)))
    } else {
        decoder.channel_layout()
    };

    let codec =
        ff::encoder::find(Id::AAC).ok_or_else(|| TranscodeError::Io("this libavcodec has no AAC encoder".into()))?;
    let mut ost = output.add_stream(codec).map_err(av("adding the audio stream"))?;
    let mut encoder =
        ff::codec::context::Context::new_with_codec(codec).encoder().audio().map_err(av("audio encoder"))?;
    encoder.set_rate(48_000);
    encoder.set_channel_layout(channels);
    encoder.set_channels(channels.channels());
    encoder.set_format(ff::format::Sample::F32(ff::format::sample::Type::Planar));
    encoder.set_bit_rate(settings.audio_bitrate as usize);
    encoder.set_time_base((1, 48_000));
    if global_header {
        encoder.set_flags(ff::codec::Flags::GLOBAL_HEADER);
    }
    let encoder = encoder.open_as(codec).map_err(av("opening the AAC encoder"))?;
    ost.set_parameters(&encoder);
    ost.set_time_base((1, 48_000));

    let tb = stream.time_base();
    let args = format!(
        "time_base={}/{}:sample_rate={}:sample_fmt={}:channel_layout=0x{:x}",
        tb.numerator(),
        tb.denominator(),
        decoder.rate(),
        decoder.format().name(),
        in_layout.bits()
    );
    let spec = format!(
        "aresample=48000,aformat=sample_fmts=fltp:sample_rates=48000:channel_layouts={}",
        if channels == ff::ChannelLayout::MONO { "mono" } else { "stereo" }
    );
    let mut graph = filter::Graph::new();
    let failed = av("building the audio filter");
    graph.add(&filter::find("abuffer").expect("libavfilter has abuffer"), "in", &args).map_err(&failed)?;
    graph.add(&filter::find("abuffersink").expect("libavfilter has abuffersink"), "out", "").map_err(&failed)?;
    graph.output("in", 0).and_then(|p| p.input("out", 0)).and_then(|p| p.parse(&spec)).map_err(&failed)?;
    graph.validate().map_err(&failed)?;
    graph.get("out").expect("made").sink().set_frame_size(encoder.frame_size());
    Ok(AudioLane { stream: index, out, decoder, graph, encoder, encoder_tb: Rational(1, 48_000) })
}

impl AudioLane {
    fn drain(&mut self, output: &mut ff::format::context::Output, out_tb: &[Rational]) -> Result<(), TranscodeError> {
        let mut decoded = frame::Audio::empty();
        while self.decoder.receive_frame(&mut decoded).is_ok() {
            let timestamp = decoded.timestamp();
            decoded.set_pts(timestamp);
            self.graph.get("in").expect("made").source().add(&decoded).map_err(av("filtering audio"))?;
            self.filtered(output, out_tb)?;
        }
        Ok(())
    }

    fn filtered(
        &mut self,
        output: &mut ff::format::context::Output,
        out_tb: &[Rational],
    ) -> Result<(), TranscodeError> {
        let mut filtered = frame::Audio::empty();
        while self.graph.get("out").expect("made").sink().frame(&mut filtered).is_ok() {
            self.encoder.send_frame(&filtered).map_err(av("encoding audio"))?;
            self.packets(output, out_tb)?;
        }
        Ok(())
    }

    fn packets(&mut self, output: &mut ff::format::context::Output, out_tb: &[Rational]) -> Result<(), TranscodeError> {
        mux(&mut self.encoder, self.out, self.encoder_tb, output, out_tb)
    }
}

/// Moves whatever packets `encoder` has ready into output stream `out`.
fn mux(
    encoder: &mut ff::encoder::Encoder,
    out: usize,
    encoder_tb: Rational,
    output: &mut ff::format::context::Output,
    out_tb: &[Rational],
) -> Result<(), TranscodeError> {
    let mut packet = ff::Packet::empty();
    while encoder.receive_packet(&mut packet).is_ok() {
        packet.set_stream(out);
        packet.rescale_ts(encoder_tb, out_tb[out]);
        packet.write_interleaved(output).map_err(av("writing the MP4"))?;
    }
    Ok(())
}

/// A decoded frame as a high-quality JPEG for the image pipeline.
fn to_jpeg(frame: &frame::Video) -> Result<Vec<u8>, TranscodeError> {
    let (w, h) = (frame.width(), frame.height());
    let mut scaler = ff::software::scaling::Context::get(
        frame.format(),
        w,
        h,
        Pixel::RGB24,
        w,
        h,
        ff::software::scaling::Flags::BICUBIC,
    )
    .map_err(av("converting the poster"))?;
    let mut rgb = frame::Video::empty();
    scaler.run(frame, &mut rgb).map_err(av("converting the poster"))?;
    let stride = rgb.stride(0);
    let row = w as usize * 3;
    let mut packed = Vec::with_capacity(row * h as usize);
    for y in 0..h as usize {
        packed.extend_from_slice(&rgb.data(0)[y * stride..y * stride + row]);
    }
    let image = turbojpeg::Image {
        pixels: packed.as_slice(),
        width: w as usize,
        pitch: row,
        height: h as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    turbojpeg::compress(image, 95, turbojpeg::Subsamp::None)
        .map(|b| b.to_vec())
        .map_err(|e| TranscodeError::Io(format!("encoding the poster: {e}")))
}

fn write_variant(dir: &Path, name: &str, encoded: &photo::Encoded) -> Result<FileVariant, TranscodeError> {
    let path = dir.join(name);
    std::fs::write(&path, &encoded.bytes).map_err(|e| TranscodeError::Io(e.to_string()))?;
    Ok(FileVariant {
        path,
        blob: encoded.blob,
        bytes: encoded.bytes.len() as u64,
        width: encoded.width,
        height: encoded.height,
    })
}

fn hash_file(path: &Path) -> Result<BlobId, TranscodeError> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(std::fs::File::open(path).map_err(|e| TranscodeError::Io(e.to_string()))?)
        .map_err(|e| TranscodeError::Io(e.to_string()))?;
    Ok(BlobId::from_hash(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What av_display_rotation_set writes for a clockwise turn.
    fn matrix(clockwise: f64) -> Vec<u8> {
        let (s, c) = (-clockwise).to_radians().sin_cos();
        let fp = |x: f64| ((x * 65536.0).round() as i32).to_le_bytes();
        [fp(c), fp(-s), fp(0.0), fp(s), fp(c), fp(0.0), fp(0.0), fp(0.0), (1i32 << 30).to_le_bytes()].concat()
    }

    #[test]
    fn display_matrices_turn_into_right_angles() {
        assert_eq!(rotation(&matrix(0.0)), 0);
        // A phone held upright writes a matrix turning the picture 90° clockwise.
        assert_eq!(rotation(&matrix(90.0)), 90);
        assert_eq!(rotation(&matrix(180.0)), 180);
        assert_eq!(rotation(&matrix(-90.0)), 270);
        assert_eq!(rotation(&matrix(89.2)), 90);
        assert_eq!(rotation(&[0; 8]), 0);
    }

    #[test]
    fn output_sizes_are_even_and_never_upscaled() {
        assert_eq!(output_size(1920, 1080, 1280), (1280, 720));
        assert_eq!(output_size(641, 361, 1280), (640, 360));
        assert_eq!(output_size(1080, 1920, 1280), (720, 1280));
        assert_eq!(output_size(3, 1, 1280), (2, 2));
    }
}
