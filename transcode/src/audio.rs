//! The audio pipeline: whatever symphonia decodes in, an Opus voice note in Ogg out.
//!
//! One streaming pass: demux and decode (symphonia; Ogg Opus and WebM Opus through libopus, which
//! symphonia does not decode), mix down to mono, resample to 48 kHz (rubato), encode 20 ms frames
//! with libopus and write them into Ogg pages with the pre-skip and granule positions of RFC 7845,
//! so every player seeks it and trims it to the exact length. Loudness is measured on the way for the
//! waveform a chat UI draws. Memory stays flat whatever the length: nothing holds more than one
//! packet of input and the encoded output, which at voice-note bitrates is about 200 KB a minute.
//!
//! Pure Rust decoders read the input; no C demuxer or decoder ever sees these bytes except libopus.

use std::time::Instant;

use ogg::writing::{PacketWriteEndInfo, PacketWriter};
use rubato::{FftFixedIn, Resampler};
use serde::{Deserialize, Serialize};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, CODEC_TYPE_OPUS, CodecParameters, DecoderOptions};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::{FormatOptions, FormatReader, Packet};
use symphonia::core::io::{MediaSource, MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::{Hint, Probe as Demuxers};
use symphonia::default::formats::{AdtsReader, FlacReader, IsoMp4Reader, MkvReader, MpaReader, OggReader, WavReader};
use symphonia_metadata::id3v2::Id3v2Reader;
use types::BlobId;

use crate::TranscodeError;

/// Opus runs at 48 kHz; every count of samples below is at this rate unless named otherwise.
pub const RATE: u32 = 48_000;
/// 20 ms, the frame size every Opus decoder handles best.
const FRAME: usize = 960;
/// Packets per Ogg page: one page a second keeps seeking cheap.
const PACKETS_PER_PAGE: u64 = 50;
/// Buckets in the waveform.
pub const WAVEFORM_BUCKETS: usize = 64;
/// Loudness below this many dBFS draws as an empty bar.
const WAVEFORM_FLOOR_DB: f32 = -50.0;
/// Samples per loudness measurement (10 ms).
const LOUDNESS_BLOCK: usize = 480;

/// The containers the pipeline reads. The declared type picks one; the bytes must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    Mp3,
    /// AAC in ADTS frames.
    Aac,
    /// MPEG-4 audio (M4A): AAC or ALAC.
    Mp4,
    Flac,
    Wav,
    /// Vorbis, Opus or FLAC in Ogg.
    Ogg,
    /// Opus or Vorbis in WebM (what browsers record).
    WebM,
}

impl Container {
    fn extension(self) -> &'static str {
        match self {
            Container::Mp3 => "mp3",
            Container::Aac => "aac",
            Container::Mp4 => "m4a",
            Container::Flac => "flac",
            Container::Wav => "wav",
            Container::Ogg => "ogg",
            Container::WebM => "webm",
        }
    }
}

/// Output quality.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Target bitrate of the VBR encoder, bits per second.
    pub bitrate: u32,
    /// libopus complexity, 0–10.
    pub complexity: u8,
}

impl Default for Settings {
    fn default() -> Self {
        Self { bitrate: 28_000, complexity: 10 }
    }
}

/// What an upload may hold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_duration_ms: u64,
    pub max_channels: u32,
    pub max_sample_rate: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_duration_ms: 60 * 60 * 1000, max_channels: 8, max_sample_rate: 192_000 }
    }
}

/// What the headers say, read before any sample is decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub sample_rate: u32,
    pub channels: u32,
    /// The duration the headers claim, when they claim one.
    pub duration_ms: Option<u64>,
}

/// The encoded voice note and what the UI shows of it.
#[derive(Clone)]
pub struct Output {
    /// Opus in Ogg.
    pub bytes: Vec<u8>,
    pub blob: BlobId,
    pub duration_ms: u64,
    /// Loudness, 0–255, in [`WAVEFORM_BUCKETS`] equal slices of the duration.
    pub waveform: Vec<u8>,
}

impl Output {
    pub const MIME: &'static str = "audio/ogg; codecs=opus";
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Output({} ms, {} bytes, {})", self.duration_ms, self.bytes.len(), self.blob)
    }
}

/// An opened input: the demuxer, the chosen track and what its headers say.
struct Input {
    reader: Box<dyn FormatReader>,
    track: u32,
    params: CodecParameters,
    probe: Probe,
}

fn corrupt(e: impl std::fmt::Display) -> TranscodeError {
    TranscodeError::Corrupt(e.to_string())
}

/// The demuxer for `container` alone: a file that passed the sniff as one container must never
/// reach another's parser (symphonia's probe otherwise scans the first MiB for any format's marker).
fn demuxers(container: Container) -> Demuxers {
    let mut probe = Demuxers::default();
    // An ID3v2 tag may lead MP3, ADTS and FLAC files; its reader skips it.
    if matches!(container, Container::Mp3 | Container::Aac | Container::Flac) {
        probe.register_all::<Id3v2Reader>();
    }
    match container {
        Container::Mp3 => probe.register_all::<MpaReader>(),
        Container::Aac => probe.register_all::<AdtsReader>(),
        Container::Flac => probe.register_all::<FlacReader>(),
        Container::Mp4 => probe.register_all::<IsoMp4Reader>(),
        Container::Wav => probe.register_all::<WavReader>(),
        Container::Ogg => probe.register_all::<OggReader>(),
        Container::WebM => probe.register_all::<MkvReader>(),
    }
    probe
}

fn open(
    mut source: impl MediaSource + 'static,
    container: Container,
    limits: &Limits,
) -> Result<Input, TranscodeError> {
    if container == Container::Mp4 {
        crate::mp4_tables::check(&mut source)?;
    }
    let source = MediaSourceStream::new(Box::new(source), MediaSourceStreamOptions::default());
    let mut hint = Hint::new();
    hint.with_extension(container.extension());
    let options = FormatOptions { enable_gapless: true, ..Default::default() };
    // A demuxer that panics on what it reads (symphonia-format-mkv 0.5.5 asserts on some broken
    // EBML) has met a corrupt file: refuse it as one, rather than as a crashed worker.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        demuxers(container).format(&hint, source, &options, &MetadataOptions::default())
    }))
    .map_err(|_| TranscodeError::Corrupt("the audio's container cannot be read".into()))?;
    let probed = opened.map_err(|e| match e {
        SymError::Unsupported(what) => TranscodeError::Unsupported(format!("no audio we can read: {what}")),
        e => corrupt(e),
    })?;
    let reader = probed.format;
    let track = reader
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL && t.codec_params.sample_rate.is_some())
        .ok_or_else(|| TranscodeError::Corrupt("the file holds no audio track".into()))?;
    let params = track.codec_params.clone();
    let sample_rate = params.sample_rate.unwrap_or_default();
    let channels = params.channels.map(|c| c.count() as u32).unwrap_or(1);
    let duration_ms = params.n_frames.map(|n| n.saturating_mul(1000) / u64::from(sample_rate.max(1)));
    let probe = Probe { sample_rate, channels, duration_ms };
    limits.check(&probe)?;
    Ok(Input { track: track.id, reader, params, probe })
}

impl Limits {
    /// Refuses what the headers already show to be over a limit.
    pub fn check(&self, probe: &Probe) -> Result<(), TranscodeError> {
        if probe.sample_rate == 0 {
            return Err(TranscodeError::Corrupt("the audio track has no sample rate".into()));
        }
        if probe.sample_rate > self.max_sample_rate {
            return Err(TranscodeError::OverLimit(format!(
                "{} Hz is over the limit of {} Hz",
                probe.sample_rate, self.max_sample_rate
            )));
        }
        if probe.channels == 0 || probe.channels > self.max_channels {
            return Err(TranscodeError::OverLimit(format!(
                "{} channels; between 1 and {} are taken",
                probe.channels, self.max_channels
            )));
        }
        if let Some(ms) = probe.duration_ms {
            self.check_duration(ms)?;
        }
        Ok(())
    }

    fn check_duration(&self, ms: u64) -> Result<(), TranscodeError> {
        if ms > self.max_duration_ms {
            return Err(TranscodeError::TooLong { duration_ms: ms, max_ms: self.max_duration_ms });
        }
        Ok(())
    }
}

/// Reads the headers alone: container, track, rate, channels and claimed duration, checked
/// against `limits`. `source` is a `File`, or a `Cursor` over bytes.
pub fn probe(
    source: impl MediaSource + 'static,
    container: Container,
    limits: &Limits,
) -> Result<Probe, TranscodeError> {
    Ok(open(source, container, limits)?.probe)
}

/// A decoder for the chosen track: symphonia's own, or libopus for Opus.
enum Decoder {
    Symphonia(Box<dyn symphonia::core::codecs::Decoder>, Option<SampleBuffer<f32>>),
    Opus(opus::Decoder, usize, Vec<f32>),
}

impl Decoder {
    fn new(params: &CodecParameters, channels: u32) -> Result<Self, TranscodeError> {
        if params.codec == CODEC_TYPE_OPUS {
            let layout = match channels {
                1 => opus::Channels::Mono,
                2 => opus::Channels::Stereo,
                n => return Err(TranscodeError::Unsupported(format!("Opus with {n} channels"))),
            };
            let decoder = opus::Decoder::new(RATE, layout).map_err(corrupt)?;
            // 120 ms is the longest an Opus packet can be.
            return Ok(Decoder::Opus(decoder, channels as usize, vec![0.0; 5760 * channels as usize]));
        }
        let decoder = symphonia::default::get_codecs()
            .make(params, &DecoderOptions::default())
            .map_err(|e| TranscodeError::Unsupported(format!("no decoder for this audio: {e}")))?;
        Ok(Decoder::Symphonia(decoder, None))
    }

    /// Decodes one packet into interleaved samples; returns them, their channel count and, where
    /// the codec says, the rate they were decoded at.
    fn decode(&mut self, packet: &Packet) -> Result<(&[f32], usize, Option<u32>), SymError> {
        match self {
            Decoder::Symphonia(decoder, buffer) => {
                let decoded = decoder.decode(packet)?;
                let spec = *decoded.spec();
                let frames = decoded.frames();
                if buffer.as_ref().is_none_or(|b| b.capacity() < frames * spec.channels.count()) {
                    *buffer = Some(SampleBuffer::new(decoded.capacity() as u64, spec));
                }
                let buffer = buffer.as_mut().expect("made above");
                buffer.copy_interleaved_ref(decoded);
                Ok((buffer.samples(), spec.channels.count(), Some(spec.rate)))
            }
            Decoder::Opus(decoder, channels, out) => {
                let frames = decoder
                    .decode_float(packet.buf(), out, false)
                    .map_err(|_| SymError::DecodeError("a corrupt Opus packet"))?;
                // The container says how much of the packet is encoder delay or padding.
                let start = (packet.trim_start() as usize).min(frames);
                let end = frames.saturating_sub(packet.trim_end() as usize).max(start);
                Ok((&out[start * *channels..end * *channels], *channels, None))
            }
        }
    }
}

/// Decodes, resamples, encodes. CPU-heavy: call it from a [`crate::Pool`] worker.
pub fn transcode(
    source: impl MediaSource + 'static,
    container: Container,
    settings: &Settings,
    limits: &Limits,
    deadline: Instant,
) -> Result<Output, TranscodeError> {
    let Input { mut reader, track, params, probe } = open(source, container, limits)?;
    let mut decoder = Decoder::new(&params, probe.channels)?;
    // The rate the samples come out at: the header's, until the decoder says otherwise on its
    // first packet (HE-AAC in MP4 declares the output rate; symphonia decodes the core, at half).
    let mut rate = probe.sample_rate;
    let mut resampler = Resample::new(rate)?;
    let mut sink = OpusSink::new(settings, probe.sample_rate)?;
    let mut mono = Vec::new();
    let (mut decoded, mut good, mut bad) = (0u64, 0u64, 0u64);
    let mut max_frames = limits.max_duration_ms.saturating_mul(u64::from(rate)) / 1000;
    loop {
        let packet = match reader.next_packet() {
            Ok(packet) => packet,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => break,
            // What follows a readable stretch cannot be demuxed: keep what came before, and let
            // the duration check below judge whether enough of the file was there.
            Err(e) if good > 0 => {
                tracing::debug!(error = %e, "audio demuxing stopped early");
                break;
            }
            Err(e) => return Err(corrupt(e)),
        };
        if packet.track_id() != track {
            continue;
        }
        let (samples, channels, decoded_rate) = match decoder.decode(&packet) {
            Ok(out) => out,
            Err(SymError::DecodeError(why)) => {
                bad += 1;
                tracing::debug!(why, "skipping an undecodable audio packet");
                continue;
            }
            Err(e) => return Err(corrupt(e)),
        };
        good += 1;
        // Headers can lie: what the decoder actually produced is held to the same limits, and a
        // stream that changes its rate midway is not one this pipeline can time or resample.
        if channels == 0 || channels as u64 > u64::from(limits.max_channels) {
            return Err(TranscodeError::OverLimit(format!(
                "the audio decodes to {channels} channels; between 1 and {} are taken",
                limits.max_channels
            )));
        }
        if let Some(decoded_rate) = decoded_rate
            && decoded_rate != rate
        {
            if good > 1 {
                return Err(TranscodeError::Corrupt(format!(
                    "the audio changes its rate from {rate} Hz to {decoded_rate} Hz midway"
                )));
            }
            if decoded_rate == 0 || decoded_rate > limits.max_sample_rate {
                return Err(TranscodeError::OverLimit(format!(
                    "the audio decodes at {decoded_rate} Hz; up to {} Hz is taken",
                    limits.max_sample_rate
                )));
            }
            rate = decoded_rate;
            resampler = Resample::new(rate)?;
            max_frames = limits.max_duration_ms.saturating_mul(u64::from(rate)) / 1000;
        }
        decoded += (samples.len() / channels) as u64;
        if decoded > max_frames {
            return Err(TranscodeError::TooLong {
                duration_ms: decoded * 1000 / u64::from(rate),
                max_ms: limits.max_duration_ms,
            });
        }
        mono.clear();
        mono.extend(samples.chunks_exact(channels).map(|frame| frame.iter().sum::<f32>() / channels as f32));
        resampler.push(&mono, &mut sink)?;
        if good.is_multiple_of(256) && Instant::now() > deadline {
            return Err(TranscodeError::TimedOut);
        }
    }
    if bad > good {
        return Err(TranscodeError::Corrupt(format!("{bad} of {} audio packets cannot be decoded", bad + good)));
    }
    if decoded == 0 {
        return Err(TranscodeError::Corrupt("the file decodes to no audio".into()));
    }
    let duration_ms = decoded * 1000 / u64::from(rate);
    if let Some(claimed) = probe.duration_ms
        && claimed.saturating_sub(duration_ms) > (claimed / 20).max(250)
    {
        return Err(TranscodeError::Corrupt(format!(
            "the headers claim {claimed} ms of audio, the file holds {duration_ms} ms"
        )));
    }
    let total = (decoded * u64::from(RATE) + u64::from(rate) / 2) / u64::from(rate);
    resampler.finish(total, &mut sink)?;
    let (bytes, waveform) = sink.finish()?;
    Ok(Output { blob: BlobId::of(&bytes), bytes, duration_ms: total * 1000 / u64::from(RATE), waveform })
}

/// Mono samples at the input rate in, 48 kHz out, with the resampler's delay cut off the front.
struct Resample {
    inner: Option<FftFixedIn<f32>>,
    pending: Vec<f32>,
    out: Vec<Vec<f32>>,
    /// Output samples still to drop: the resampler's delay.
    skip: usize,
    /// Samples passed on so far.
    emitted: u64,
}

impl Resample {
    fn new(rate: u32) -> Result<Self, TranscodeError> {
        let inner = if rate == RATE {
            None
        } else {
            Some(
                FftFixedIn::new(rate as usize, RATE as usize, 1024, 2, 1)
                    .map_err(|e| TranscodeError::Unsupported(format!("cannot resample {rate} Hz: {e}")))?,
            )
        };
        let skip = inner.as_ref().map_or(0, |r| r.output_delay());
        let out = vec![vec![0.0; inner.as_ref().map_or(0, |r| r.output_frames_max())]];
        Ok(Self { inner, pending: Vec::new(), out, skip, emitted: 0 })
    }

    fn push(&mut self, samples: &[f32], sink: &mut OpusSink) -> Result<(), TranscodeError> {
        let Some(inner) = &mut self.inner else {
            self.emitted += samples.len() as u64;
            return sink.push(samples);
        };
        self.pending.extend_from_slice(samples);
        let mut used = 0;
        while self.pending.len() - used >= inner.input_frames_next() {
            let need = inner.input_frames_next();
            let (_, written) = inner
                .process_into_buffer(&[&self.pending[used..used + need]], &mut self.out, None)
                .map_err(|e| TranscodeError::Corrupt(format!("resampling failed: {e}")))?;
            used += need;
            let mut produced = &self.out[0][..written];
            let dropped = self.skip.min(produced.len());
            self.skip -= dropped;
            produced = &produced[dropped..];
            self.emitted += produced.len() as u64;
            sink.push(produced)?;
        }
        self.pending.drain(..used);
        Ok(())
    }

    /// Flushes the resampler with silence until `total` samples have come out, and no more.
    fn finish(&mut self, total: u64, sink: &mut OpusSink) -> Result<(), TranscodeError> {
        if self.inner.is_none() {
            return Ok(());
        }
        // Each chunk of silence completes at least one block of the resampler, so this ends.
        let silence = vec![0.0; 1024];
        sink.limit = Some(total);
        while self.emitted < total {
            self.push(&silence, sink)?;
        }
        Ok(())
    }
}

/// 48 kHz mono in, Ogg Opus out, loudness measured on the way.
struct OpusSink {
    encoder: opus::Encoder,
    pages: PacketWriter<'static, Vec<u8>>,
    pre_skip: u64,
    frame: Vec<f32>,
    /// The last encoded packet, held back until we know whether it ends the stream.
    held: Option<Vec<u8>>,
    packets: u64,
    /// Real samples taken (not counting the silence that flushes the encoder).
    samples: u64,
    /// When set, samples past this count are dropped (the resampler's flush overshoots).
    limit: Option<u64>,
    loudness: Vec<f32>,
    block: (f32, usize),
}

const SERIAL: u32 = 0x436f_7572; // "Cour"

impl OpusSink {
    fn new(settings: &Settings, input_rate: u32) -> Result<Self, TranscodeError> {
        let failed = |e: opus::Error| TranscodeError::Io(format!("the Opus encoder refused its settings: {e}"));
        let mut encoder = opus::Encoder::new(RATE, opus::Channels::Mono, opus::Application::Voip).map_err(failed)?;
        encoder.set_bitrate(opus::Bitrate::Bits(settings.bitrate.clamp(6_000, 510_000) as i32)).map_err(failed)?;
        encoder.set_vbr(true).map_err(failed)?;
        // Unconstrained VBR (ffmpeg's `-vbr on`): the bitrate follows the speech.
        encoder.set_vbr_constraint(false).map_err(failed)?;
        encoder.set_complexity(i32::from(settings.complexity.min(10))).map_err(failed)?;
        let pre_skip = encoder.get_lookahead().map_err(failed)?.max(0) as u64;

        let mut pages = PacketWriter::new(Vec::new());
        let io = |e: std::io::Error| TranscodeError::Io(e.to_string());
        // RFC 7845 §5.1: the identification header, alone on the first page.
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1); // version
        head.push(1); // channels
        head.extend_from_slice(&(pre_skip as u16).to_le_bytes());
        head.extend_from_slice(&input_rate.to_le_bytes());
        head.extend_from_slice(&0i16.to_le_bytes()); // output gain
        head.push(0); // mapping family: mono/stereo
        pages.write_packet(head, SERIAL, PacketWriteEndInfo::EndPage, 0).map_err(io)?;
        // §5.2: the comment header, alone on the second page.
        let vendor = concat!("courier ", env!("CARGO_PKG_VERSION"));
        let mut tags = Vec::new();
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor.as_bytes());
        tags.extend_from_slice(&0u32.to_le_bytes());
        pages.write_packet(tags, SERIAL, PacketWriteEndInfo::EndPage, 0).map_err(io)?;

        Ok(Self {
            encoder,
            pages,
            pre_skip,
            frame: Vec::with_capacity(FRAME),
            held: None,
            packets: 0,
            samples: 0,
            limit: None,
            loudness: Vec::new(),
            block: (0.0, 0),
        })
    }

    fn push(&mut self, mut samples: &[f32]) -> Result<(), TranscodeError> {
        if let Some(limit) = self.limit {
            let room = limit.saturating_sub(self.samples) as usize;
            samples = &samples[..samples.len().min(room)];
        }
        self.samples += samples.len() as u64;
        for &s in samples {
            self.block.0 += s * s;
            self.block.1 += 1;
            if self.block.1 == LOUDNESS_BLOCK {
                self.loudness.push(self.block.0 / LOUDNESS_BLOCK as f32);
                self.block = (0.0, 0);
            }
        }
        self.feed(samples)
    }

    fn feed(&mut self, mut samples: &[f32]) -> Result<(), TranscodeError> {
        while !samples.is_empty() {
            let take = (FRAME - self.frame.len()).min(samples.len());
            self.frame.extend_from_slice(&samples[..take]);
            samples = &samples[take..];
            if self.frame.len() == FRAME {
                self.encode_frame()?;
            }
        }
        Ok(())
    }

    fn encode_frame(&mut self) -> Result<(), TranscodeError> {
        let packet = self
            .encoder
            .encode_vec_float(&self.frame, 4000)
            .map_err(|e| TranscodeError::Io(format!("Opus encoding failed: {e}")))?;
        self.frame.clear();
        if let Some(previous) = self.held.replace(packet) {
            self.write(previous, false)?;
        }
        Ok(())
    }

    fn write(&mut self, packet: Vec<u8>, last: bool) -> Result<(), TranscodeError> {
        self.packets += 1;
        // The granule position of a page is the sample count, pre-skip included, at the end of
        // its last packet; on the final page it is what lets a player cut the padding off.
        let (end, granule) = if last {
            (PacketWriteEndInfo::EndStream, self.pre_skip + self.samples)
        } else if self.packets.is_multiple_of(PACKETS_PER_PAGE) {
            (PacketWriteEndInfo::EndPage, self.packets * FRAME as u64)
        } else {
            (PacketWriteEndInfo::NormalPacket, self.packets * FRAME as u64)
        };
        self.pages.write_packet(packet, SERIAL, end, granule).map_err(|e| TranscodeError::Io(e.to_string()))
    }

    /// Pushes the encoder's look-ahead out with silence, ends the stream, and measures the waveform.
    fn finish(mut self) -> Result<(Vec<u8>, Vec<u8>), TranscodeError> {
        let mut flush = self.pre_skip as usize;
        // Whatever the look-ahead, the last frame is padded to full length.
        flush += (FRAME - (self.frame.len() + flush) % FRAME) % FRAME;
        self.feed(&vec![0.0; flush])?;
        if let Some(last) = self.held.take() {
            self.write(last, true)?;
        }
        if self.block.1 > 0 {
            self.loudness.push(self.block.0 / self.block.1 as f32);
        }
        let waveform = waveform(&self.loudness);
        Ok((self.pages.into_inner(), waveform))
    }
}

/// Mean-square loudness per block → [`WAVEFORM_BUCKETS`] bars, 0–255 on a dB scale from
/// [`WAVEFORM_FLOOR_DB`] to full scale.
fn waveform(blocks: &[f32]) -> Vec<u8> {
    (0..WAVEFORM_BUCKETS)
        .map(|i| {
            if blocks.is_empty() {
                return 0;
            }
            let start = i * blocks.len() / WAVEFORM_BUCKETS;
            let end = ((i + 1) * blocks.len() / WAVEFORM_BUCKETS).max(start + 1).min(blocks.len());
            let start = start.min(end - 1);
            let power = blocks[start..end].iter().sum::<f32>() / (end - start) as f32;
            let db = 10.0 * power.max(1e-10).log10();
            ((db - WAVEFORM_FLOOR_DB) / -WAVEFORM_FLOOR_DB * 255.0).clamp(0.0, 255.0).round() as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::time::Duration;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// A WAV of `secs` seconds: a 440 Hz tone at half scale, silent in the second half.
    fn wav(rate: u32, channels: u16, secs: f32) -> Vec<u8> {
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut out = Cursor::new(Vec::new());
        let mut writer = hound::WavWriter::new(&mut out, spec).unwrap();
        let frames = (rate as f32 * secs) as u32;
        for i in 0..frames {
            let t = i as f32 / rate as f32;
            let v = if i < frames / 2 { (t * 440.0 * std::f32::consts::TAU).sin() * 0.5 } else { 0.0 };
            for _ in 0..channels {
                writer.write_sample((v * i16::MAX as f32) as i16).unwrap();
            }
        }
        writer.finalize().unwrap();
        out.into_inner()
    }

    /// Reads an Ogg Opus stream back: (pre-skip, final granule, decoded samples after pre-skip).
    fn decode_ogg_opus(bytes: &[u8]) -> (u64, u64, Vec<f32>) {
        let mut reader = ogg::PacketReader::new(Cursor::new(bytes));
        let head = reader.read_packet_expected().unwrap();
        assert_eq!(&head.data[..8], b"OpusHead");
        assert_eq!(head.data[9], 1, "mono");
        let pre_skip = u64::from(u16::from_le_bytes([head.data[10], head.data[11]]));
        let tags = reader.read_packet_expected().unwrap();
        assert_eq!(&tags.data[..8], b"OpusTags");
        let mut decoder = opus::Decoder::new(RATE, opus::Channels::Mono).unwrap();
        let mut pcm = Vec::new();
        let mut granule = 0;
        let mut buf = vec![0.0; 5760];
        while let Some(packet) = reader.read_packet().unwrap() {
            let n = decoder.decode_float(&packet.data, &mut buf, false).unwrap();
            pcm.extend_from_slice(&buf[..n]);
            granule = packet.absgp_page();
        }
        let kept = (granule - pre_skip) as usize;
        assert!(pcm.len() >= kept + pre_skip as usize, "the granule promises more than the packets hold");
        (pre_skip, granule, pcm[pre_skip as usize..pre_skip as usize + kept].to_vec())
    }

    #[test]
    fn a_stereo_44k_wav_becomes_mono_48k_opus_of_the_same_length() {
        let out = transcode(
            Cursor::new(wav(44_100, 2, 3.0)),
            Container::Wav,
            &Settings::default(),
            &Limits::default(),
            far(),
        )
        .unwrap();
        assert_eq!(out.duration_ms, 3000);
        let (pre_skip, granule, pcm) = decode_ogg_opus(&out.bytes);
        assert!(pre_skip > 0);
        assert_eq!(granule - pre_skip, 3 * 48_000, "the final granule trims the stream to its exact length");
        // The tone is in the first half and silence in the second, and stays where it was.
        let rms = |s: &[f32]| (s.iter().map(|x| x * x).sum::<f32>() / s.len() as f32).sqrt();
        assert!((rms(&pcm[12_000..60_000]) - 0.354).abs() < 0.05, "tone rms {}", rms(&pcm[12_000..60_000]));
        assert!(rms(&pcm[80_000..140_000]) < 0.01);
        // Voice-note bitrate: 3 s at ~28 kb/s is about 10 KB.
        assert!(out.bytes.len() < 16_000, "{} bytes", out.bytes.len());
        assert_eq!(out.waveform.len(), WAVEFORM_BUCKETS);
        assert!(out.waveform[..30].iter().all(|&b| b > 180), "{:?}", out.waveform);
        assert!(out.waveform[34..].iter().all(|&b| b < 20), "{:?}", out.waveform);
    }

    #[test]
    fn limits_are_checked_from_the_headers() {
        let limits = Limits { max_duration_ms: 2000, ..Default::default() };
        let e = probe(Cursor::new(wav(8000, 1, 3.0)), Container::Wav, &limits).unwrap_err();
        assert_eq!(e, TranscodeError::TooLong { duration_ms: 3000, max_ms: 2000 });
        let limits = Limits { max_channels: 1, ..Default::default() };
        assert_eq!(probe(Cursor::new(wav(8000, 2, 0.1)), Container::Wav, &limits).unwrap_err().code(), "over_limit");
        let p = probe(Cursor::new(wav(16_000, 1, 1.5)), Container::Wav, &Limits::default()).unwrap();
        assert_eq!(p, Probe { sample_rate: 16_000, channels: 1, duration_ms: Some(1500) });
    }

    #[test]
    fn a_file_that_claims_more_than_it_holds_is_corrupt() {
        let mut bytes = wav(8000, 1, 4.0);
        bytes.truncate(bytes.len() / 4);
        let e =
            transcode(Cursor::new(bytes), Container::Wav, &Settings::default(), &Limits::default(), far()).unwrap_err();
        assert!(matches!(e, TranscodeError::Corrupt(ref m) if m.contains("claim")), "{e}");
    }

    #[test]
    fn garbage_is_refused() {
        let e =
            transcode(Cursor::new(vec![7u8; 4096]), Container::Mp3, &Settings::default(), &Limits::default(), far())
                .unwrap_err();
        assert!(e.is_permanent(), "{e}");
    }

    #[test]
    fn the_waveform_spreads_short_inputs_over_every_bucket() {
        assert_eq!(waveform(&[]), vec![0; WAVEFORM_BUCKETS]);
        let w = waveform(&[1.0, 0.0]);
        assert_eq!(&w[..32], &[255; 32]);
        assert_eq!(&w[32..], &[0; 32]);
    }
}
