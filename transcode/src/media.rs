//! Which pipeline an upload goes to: its declared type, checked against its first bytes.

use types::MediaKind;

use crate::{TranscodeError, audio, photo, video};

/// An upload's type, as declared and confirmed by sniffing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaType {
    Image(photo::Format),
    Audio(audio::Container),
    /// The container, and the declared MIME type kept for the record.
    Video(video::Container, &'static str),
}

const TAKEN: &str = "send JPEG, PNG, WebP or GIF images; MP3, AAC, M4A, FLAC, WAV, Ogg or WebM audio; \
                     MP4, MOV, 3GP, WebM or MKV video";

impl MediaType {
    /// The type a declared `Content-Type` (without parameters) names, if a pipeline takes it.
    pub fn from_mime(mime: &str) -> Result<Self, TranscodeError> {
        use audio::Container as A;
        use video::Container as V;
        let lower = mime.to_ascii_lowercase();
        Ok(match lower.as_str() {
            "audio/mpeg" | "audio/mp3" => MediaType::Audio(A::Mp3),
            "audio/aac" | "audio/aacp" | "audio/x-aac" => MediaType::Audio(A::Aac),
            "audio/mp4" | "audio/m4a" | "audio/x-m4a" => MediaType::Audio(A::Mp4),
            "audio/flac" | "audio/x-flac" => MediaType::Audio(A::Flac),
            "audio/wav" | "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => MediaType::Audio(A::Wav),
            "audio/ogg" | "audio/opus" | "application/ogg" => MediaType::Audio(A::Ogg),
            "audio/webm" => MediaType::Audio(A::WebM),
            "video/mp4" | "video/x-m4v" => MediaType::Video(V::Mp4, "video/mp4"),
            "video/quicktime" => MediaType::Video(V::Mp4, "video/quicktime"),
            "video/3gpp" | "video/3gpp2" => MediaType::Video(V::Mp4, "video/3gpp"),
            "video/webm" => MediaType::Video(V::Matroska, "video/webm"),
            "video/x-matroska" | "video/matroska" => MediaType::Video(V::Matroska, "video/x-matroska"),
            m if m.starts_with("image/") => MediaType::Image(photo::Format::from_mime(m)?),
            other => {
                return Err(TranscodeError::Unsupported(format!("{other} is not a type this server takes; {TAKEN}")));
            }
        })
    }

    /// The MIME type recorded for the upload; [`MediaType::from_mime`] reads it back.
    pub fn mime(self) -> &'static str {
        use audio::Container as A;
        match self {
            MediaType::Image(format) => format.mime(),
            MediaType::Audio(A::Mp3) => "audio/mpeg",
            MediaType::Audio(A::Aac) => "audio/aac",
            MediaType::Audio(A::Mp4) => "audio/mp4",
            MediaType::Audio(A::Flac) => "audio/flac",
            MediaType::Audio(A::Wav) => "audio/wav",
            MediaType::Audio(A::Ogg) => "audio/ogg",
            MediaType::Audio(A::WebM) => "audio/webm",
            MediaType::Video(_, mime) => mime,
        }
    }

    pub fn kind(self) -> MediaKind {
        match self {
            MediaType::Image(_) => MediaKind::Image,
            MediaType::Audio(_) => MediaKind::Audio,
            MediaType::Video(..) => MediaKind::Video,
        }
    }

    /// Whether the first bytes of a file (32 are enough) are this type's.
    pub fn matches(self, head: &[u8]) -> bool {
        Sniffed::of(head).is_some_and(|sniffed| sniffed.fits(self))
    }

    /// What the first bytes look like, for an error message.
    pub fn describe(head: &[u8]) -> &'static str {
        match Sniffed::of(head) {
            Some(Sniffed::Image(f)) => f.mime(),
            Some(Sniffed::IsoMedia) => "an MP4/MOV file",
            Some(Sniffed::Ebml) => "a WebM/Matroska file",
            Some(Sniffed::Ogg) => "an Ogg file",
            Some(Sniffed::Wav) => "a WAV file",
            Some(Sniffed::Flac) => "a FLAC file",
            Some(Sniffed::Id3) => "an MP3 or AAC file",
            Some(Sniffed::Mpeg) => "an MP3 file",
            Some(Sniffed::Adts) => "an AAC file",
            None => "not a type we recognise",
        }
    }
}

/// What magic numbers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniffed {
    Image(photo::Format),
    /// ISO base media (MP4, MOV, M4A, 3GP): a known box type at offset 4.
    IsoMedia,
    Ebml,
    Ogg,
    Wav,
    Flac,
    /// An ID3v2 tag, which MP3 and ADTS AAC files (and some FLAC) begin with.
    Id3,
    /// An MPEG audio frame header, layers I–III.
    Mpeg,
    /// An ADTS frame header.
    Adts,
}

impl Sniffed {
    fn of(head: &[u8]) -> Option<Self> {
        if let Some(format) = photo::Format::sniff(head) {
            return Some(Sniffed::Image(format));
        }
        let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
        if [&b"ftyp"[..], b"moov", b"mdat", b"wide", b"free", b"skip"].iter().any(|b| at(4, b)) {
            return Some(Sniffed::IsoMedia);
        }
        if at(0, &[0x1A, 0x45, 0xDF, 0xA3]) {
            return Some(Sniffed::Ebml);
        }
        if at(0, b"OggS") {
            return Some(Sniffed::Ogg);
        }
        if at(0, b"RIFF") && at(8, b"WAVE") {
            return Some(Sniffed::Wav);
        }
        if at(0, b"fLaC") {
            return Some(Sniffed::Flac);
        }
        if at(0, b"ID3") {
            return Some(Sniffed::Id3);
        }
        match head {
            // 12 sync bits, then layer 00: ADTS.
            [0xFF, b, ..] if b & 0xF6 == 0xF0 => Some(Sniffed::Adts),
            // 11 sync bits, a valid version and a layer other than 00.
            [0xFF, b, ..] if b & 0xE0 == 0xE0 && b & 0x18 != 0x08 && b & 0x06 != 0 => Some(Sniffed::Mpeg),
            _ => None,
        }
    }

    fn fits(self, declared: MediaType) -> bool {
        use audio::Container as A;
        match (self, declared) {
            (Sniffed::Image(f), MediaType::Image(d)) => f == d,
            (Sniffed::IsoMedia, MediaType::Audio(A::Mp4) | MediaType::Video(video::Container::Mp4, _)) => true,
            (Sniffed::Ebml, MediaType::Audio(A::WebM) | MediaType::Video(video::Container::Matroska, _)) => true,
            (Sniffed::Ogg, MediaType::Audio(A::Ogg)) => true,
            (Sniffed::Wav, MediaType::Audio(A::Wav)) => true,
            (Sniffed::Flac | Sniffed::Id3, MediaType::Audio(A::Flac)) => true,
            (Sniffed::Id3 | Sniffed::Mpeg, MediaType::Audio(A::Mp3)) => true,
            (Sniffed::Id3 | Sniffed::Adts, MediaType::Audio(A::Aac)) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_types_must_match_their_bytes() {
        let mp4 = b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2avc1mp41";
        let video = MediaType::from_mime("video/mp4").unwrap();
        assert!(video.matches(mp4));
        assert!(MediaType::from_mime("audio/x-m4a").unwrap().matches(mp4));
        assert!(!MediaType::from_mime("video/webm").unwrap().matches(mp4));
        // A playlist calling itself MP4 is not one.
        assert!(!video.matches(b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n"));
        assert_eq!(MediaType::describe(b"#EXTM3U\n"), "not a type we recognise");

        let mp3 = MediaType::from_mime("audio/mpeg").unwrap();
        assert!(mp3.matches(&[0xFF, 0xFB, 0x90, 0x64]));
        assert!(mp3.matches(b"ID3\x04\0\0\0\0\0\0"));
        assert!(!mp3.matches(&[0xFF, 0xF1, 0x50, 0x80]), "ADTS is AAC, not MP3");
        assert!(MediaType::from_mime("audio/aac").unwrap().matches(&[0xFF, 0xF1, 0x50, 0x80]));
        assert!(MediaType::from_mime("audio/wav").unwrap().matches(b"RIFF\x24\0\0\0WAVEfmt "));
        assert!(MediaType::from_mime("audio/ogg").unwrap().matches(b"OggS\0\x02"));
        assert!(MediaType::from_mime("image/png").unwrap().matches(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"));
    }

    #[test]
    fn recorded_mime_types_read_back() {
        for mime in [
            "audio/mpeg",
            "audio/aac",
            "audio/mp4",
            "audio/flac",
            "audio/wav",
            "audio/ogg",
            "audio/webm",
            "video/mp4",
            "video/quicktime",
            "video/3gpp",
            "video/webm",
            "video/x-matroska",
            "image/jpeg",
        ] {
            let t = MediaType::from_mime(mime).unwrap();
            assert_eq!(t.mime(), mime);
            assert_eq!(MediaType::from_mime(t.mime()).unwrap(), t);
        }
        assert_eq!(MediaType::from_mime("VIDEO/MP4").unwrap().kind(), MediaKind::Video);
        assert_eq!(MediaType::from_mime("text/plain").unwrap_err().code(), "unsupported_media_type");
    }
}
