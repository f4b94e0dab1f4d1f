//! A check of an MP4's box tree before symphonia reads it.
//!
//! symphonia sizes buffers from what an MP4 claims: the `stsc`, `stsz`, `stts`, `stco` and `co64`
//! tables from the entry count in their header (`Vec::with_capacity(count)`), each packet from its
//! sample size (an `stsz` entry, or in a fragmented file a `trun` entry or a `tfhd`/`trex` default),
//! `hdlr` names and `ilst` values from their box sizes (minus a header, unchecked, so a box too
//! small underflows), and the ALAC decoder its buffers from the cookie's frame length. A
//! count of 0xFFFFFFFF in a 17 KB file asks for tens of gigabytes, and a failed allocation aborts
//! the process. The sandbox bounds what that costs (the worker dies at its `RLIMIT_AS`), but the
//! upload deserves a plain "corrupt" answer, and the fuzzers cannot look past it. So the worker
//! walks the tree first, from where symphonia will start (the first `ftyp` marker), and refuses
//! a box that runs past its parent or is too small for its kind, a table whose entries cannot fit in
//! its box, a sample larger than the file, or an ALAC cookie beyond what an encoder writes.

use std::io::{Read, Seek, SeekFrom};

use crate::TranscodeError;

/// Boxes whose children symphonia reads as boxes.
const CONTAINERS: [&[u8; 4]; 12] =
    [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"udta", b"edts", b"dinf", b"mvex", b"moof", b"traf", b"ilst"];

/// The sample entry types symphonia 0.5 reads as audio (`atoms/stsd.rs`).
const AUDIO_ENTRIES: [&[u8]; 16] = [
    b"mp4a", b"alac", b"fLaC", b"Opus", b".mp3", b"lpcm", b"wave", b"alaw", b"ulaw", b"raw ", b"sowt", b"twos",
    b"in24", b"in32", b"fl32", b"fl64",
];

/// The largest ALAC frame length taken: Apple's encoder writes 4096.
const MAX_ALAC_FRAME: u32 = 65_536;
/// Nesting deeper than a real file's is refused rather than followed.
const MAX_DEPTH: u32 = 16;
/// Boxes looked at in all; a real voice note has a few dozen.
const MAX_BOXES: u32 = 100_000;
/// How far symphonia's probe searches for the `ftyp` marker.
const PROBE_SEARCH: u64 = 1024 * 1024;

fn corrupt(what: String) -> TranscodeError {
    TranscodeError::Corrupt(what)
}

fn name(kind: &[u8; 4]) -> String {
    String::from_utf8_lossy(kind).into_owned()
}

/// Refuses a file whose boxes claim more than they hold; leaves `source` at its start.
pub(crate) fn check(source: &mut (impl Read + Seek)) -> Result<(), TranscodeError> {
    let len = source.seek(SeekFrom::End(0)).map_err(io)?;
    if let Some(start) = first_ftyp(source)? {
        let mut walk = Walk { len, budget: MAX_BOXES };
        walk.boxes(source, start, len, None, 0)?;
    }
    source.seek(SeekFrom::Start(0)).map_err(io)?;
    Ok(())
}

/// Where symphonia's isomp4 reader starts: four bytes before the first `ftyp`.
fn first_ftyp(source: &mut (impl Read + Seek)) -> Result<Option<u64>, TranscodeError> {
    source.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut head = Vec::new();
    source.take(PROBE_SEARCH + 16).read_to_end(&mut head).map_err(io)?;
    Ok(head.windows(4).position(|w| w == b"ftyp").map(|at| (at as u64).saturating_sub(4)))
}

fn io(e: std::io::Error) -> TranscodeError {
    TranscodeError::Io(format!("reading the file: {e}"))
}

/// Reads `N` bytes at `at`, or `None` past the end.
fn read_at<const N: usize>(source: &mut (impl Read + Seek), at: u64) -> Result<Option<[u8; N]>, TranscodeError> {
    source.seek(SeekFrom::Start(at)).map_err(io)?;
    let mut buf = [0u8; N];
    match source.read_exact(&mut buf) {
        Ok(()) => Ok(Some(buf)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(io(e)),
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

struct Walk {
    /// The file's length: nothing in it can be larger.
    len: u64,
    budget: u32,
}

impl Walk {
    /// Checks the boxes between `start` and `end` (children of `parent`), descending into
    /// containers.
    fn boxes(
        &mut self,
        source: &mut (impl Read + Seek),
        start: u64,
        end: u64,
        parent: Option<[u8; 4]>,
        depth: u32,
    ) -> Result<(), TranscodeError> {
        if depth > MAX_DEPTH {
            return Err(corrupt("the MP4's boxes nest too deep".into()));
        }
        let mut at = start;
        while at + 8 <= end {
            self.budget = self.budget.checked_sub(1).ok_or_else(|| corrupt("the MP4 has too many boxes".into()))?;
            let Some(header) = read_at::<8>(source, at)? else { break };
            let kind: [u8; 4] = header[4..8].try_into().expect("four bytes");
            let (size, body) = match u32_at(&header, 0) {
                // To the end of the file: symphonia takes it at the top only, and reads no
                // children of it.
                0 if parent.is_none() => (end - at, end),
                1 => match read_at::<8>(source, at + 8)? {
                    Some(large) => (u64::from_be_bytes(large), at + 16),
                    None => break,
                },
                size => (u64::from(size), at + 8),
            };
            if size < body - at {
                return Err(corrupt(format!("the MP4's {} box is smaller than its header", name(&kind))));
            }
            let box_end = match at.checked_add(size).filter(|&box_end| box_end <= end) {
                Some(box_end) => box_end,
                // symphonia reads a truncated top-level box's children up to the end of the
                // file, so they are checked up to there; below the top, a child must fit.
                None if parent.is_none() => end,
                None => return Err(corrupt(format!("the MP4's {} box runs past its parent", name(&kind)))),
            };
            if CONTAINERS.contains(&&kind) || parent == Some(*b"ilst") {
                // Containers, and each metadata item in `ilst` (which holds `data` boxes).
                self.boxes(source, body, box_end, Some(kind), depth + 1)?;
            } else if kind == *b"meta" {
                // A full box: version and flags, then children.
                if box_end - body < 4 {
                    return Err(corrupt("the MP4's meta box is too small".into()));
                }
                self.boxes(source, body + 4, box_end, Some(kind), depth + 1)?;
            } else if kind == *b"stsd" {
                sample_descriptions(source, body, box_end)?;
            } else {
                self.leaf(source, &kind, body, box_end)?;
            }
            at = box_end;
        }
        Ok(())
    }

    /// A box symphonia reads a size from, or sizes a buffer by.
    fn leaf(&self, source: &mut (impl Read + Seek), kind: &[u8; 4], body: u64, end: u64) -> Result<(), TranscodeError> {
        // Boxes whose payload symphonia takes as "the box's size minus a fixed header".
        let least = match kind {
            b"hdlr" => 24,
            b"data" => 8,
            b"mean" | b"name" => 4,
            _ => 0,
        };
        if end - body < least {
            return Err(corrupt(format!("the MP4's {} box is too small", name(kind))));
        }
        match kind {
            b"trex" | b"tfhd" | b"trun" => return self.fragment(source, kind, body, end),
            _ => {}
        }
        // After version and flags: the entry count and each entry's size; stsz has a sample size
        // first, and entries only when that is 0.
        let (count_at, entry): (u64, u64) = match kind {
            b"stsc" => (4, 12),
            b"stts" | b"ctts" | b"co64" => (4, 8),
            b"stco" | b"stss" => (4, 4),
            b"stsz" => (8, 4),
            _ => return Ok(()),
        };
        if end - body < count_at + 4 {
            return Err(corrupt(format!("the MP4's {} box is cut short", name(kind))));
        }
        // The field before the count (version and flags, or stsz's sample size) and the count.
        let Some(head) = read_at::<8>(source, body + count_at - 4)? else {
            return Err(corrupt(format!("the MP4's {} box is cut short", name(kind))));
        };
        let count = u64::from(u32_at(&head, 4));
        if kind == b"stsz" && u32_at(&head, 0) != 0 {
            // One size for every sample: a packet is read whole, so it cannot exceed the file.
            return self.sample_size(u64::from(u32_at(&head, 0)));
        }
        let room = end - (body + count_at + 4);
        if count.saturating_mul(entry) > room {
            return Err(corrupt(format!("the MP4's {} table claims {count} entries in {room} bytes", name(kind))));
        }
        if kind == b"stsz" {
            source.seek(SeekFrom::Start(body + count_at + 4)).map_err(io)?;
            let mut sizes = std::io::BufReader::new(source.take(count * 4));
            let mut size = [0u8; 4];
            for _ in 0..count {
                sizes.read_exact(&mut size).map_err(io)?;
                self.sample_size(u64::from(u32::from_be_bytes(size)))?;
            }
        }
        Ok(())
    }

    /// A fragmented file's sample sizes (packets are read whole, sized by them): the defaults in
    /// `trex` and `tfhd`, and each `trun` entry's.
    fn fragment(
        &self,
        source: &mut (impl Read + Seek),
        kind: &[u8; 4],
        body: u64,
        end: u64,
    ) -> Result<(), TranscodeError> {
        let short = || corrupt(format!("the MP4's {} box is cut short", name(kind)));
        let Some(head) = read_at::<4>(source, body)? else { return Err(short()) };
        let flags = u32::from_be_bytes(head) & 0x00FF_FFFF;
        let u32_field = |source: &mut _, at: u64| -> Result<u64, TranscodeError> {
            if at + 4 > end {
                return Err(short());
            }
            Ok(u64::from(u32::from_be_bytes(read_at::<4>(source, at)?.ok_or_else(short)?)))
        };
        match kind {
            // Track id, sample description index, duration, then the default size.
            b"trex" => self.sample_size(u32_field(source, body + 16)?),
            b"tfhd" => {
                // Track id, then the fields its flags say are present, in this order.
                let mut at = body + 8;
                if flags & 0x01 != 0 {
                    at += 8;
                }
                for (flag, width) in [(0x02, 4), (0x08, 4)] {
                    if flags & flag != 0 {
                        at += width;
                    }
                }
                if flags & 0x10 != 0 {
                    self.sample_size(u32_field(source, at)?)?;
                }
                Ok(())
            }
            _ => {
                // The sample count, an optional data offset and first-sample flags, then per
                // sample the fields its flags say are present (duration, size, flags, offset).
                let count = u32_field(source, body + 4)?;
                let mut at = body + 8;
                for flag in [0x01, 0x04] {
                    if flags & flag != 0 {
                        at += 4;
                    }
                }
                let fields: Vec<u32> = [0x100, 0x200, 0x400, 0x800].into_iter().filter(|f| flags & f != 0).collect();
                let entry = 4 * fields.len() as u64;
                if count.saturating_mul(entry) > end.saturating_sub(at) {
                    let room = end.saturating_sub(at);
                    return Err(corrupt(format!("the MP4's trun claims {count} samples in {room} bytes")));
                }
                if let Some(size_at) = fields.iter().position(|f| *f == 0x200) {
                    for n in 0..count {
                        self.sample_size(u32_field(source, at + n * entry + 4 * size_at as u64)?)?;
                    }
                }
                Ok(())
            }
        }
    }

    fn sample_size(&self, size: u64) -> Result<(), TranscodeError> {
        if size > self.len {
            return Err(corrupt(format!("the MP4 claims a {size}-byte sample in a {}-byte file", self.len)));
        }
        Ok(())
    }
}

/// The sample descriptions. symphonia reads each entry's fixed fields (more of them in versions 1
/// and 2 of an audio entry), subtracts their length from the entry's, then reads the child boxes:
/// each must fit, and an ALAC cookie must name a frame an encoder writes.
fn sample_descriptions(source: &mut (impl Read + Seek), body: u64, end: u64) -> Result<(), TranscodeError> {
    // Version and flags, the entry count, then the entries.
    let mut at = body + 8;
    while at + 8 <= end {
        let Some(header) = read_at::<8>(source, at)? else { break };
        let size = u64::from(u32_at(&header, 0));
        if size < 8 || at + size > end {
            return Err(corrupt("an MP4 sample description runs past its box".into()));
        }
        // symphonia reads these as audio sample entries; any other (a chapter track's `tx3g`,
        // cover art's `jpeg`) it passes over.
        if !AUDIO_ENTRIES.contains(&&header[4..8]) {
            at += size;
            continue;
        }
        // Reserved, data reference index, then the audio entry's version.
        let Some(version) = read_at::<2>(source, at + 16)? else { break };
        let fixed = match u16::from_be_bytes(version) {
            0 => 28,
            1 => 28 + 16,
            2 => 28 + 36,
            // symphonia refuses other versions before reading further.
            _ => 0,
        };
        if fixed > 0 {
            if size < 8 + fixed {
                return Err(corrupt("an MP4 audio sample entry is shorter than its fields".into()));
            }
            entry_children(source, at + 8 + fixed, at + size)?;
        }
        at += size;
    }
    Ok(())
}

/// The boxes inside an audio sample entry (`esds`, `alac`, `dOps`, `dfLa`, …).
fn entry_children(source: &mut (impl Read + Seek), start: u64, end: u64) -> Result<(), TranscodeError> {
    let mut at = start;
    while at + 8 <= end {
        let Some(header) = read_at::<8>(source, at)? else { break };
        let size = u64::from(u32_at(&header, 0));
        let kind: [u8; 4] = header[4..8].try_into().expect("four bytes");
        if size < 8 || at + size > end {
            return Err(corrupt(format!("the MP4's {} box runs past its sample entry", name(&kind))));
        }
        // A full box's version and flags, plus the least each reader takes from the rest.
        let least = match &kind {
            b"esds" => 4 + 2,
            b"alac" => 4 + 24,
            _ => 0,
        };
        if size - 8 < least {
            return Err(corrupt(format!("the MP4's {} box is too small", name(&kind))));
        }
        if kind == *b"alac" {
            alac_cookie(source, at + 8)?;
        }
        at += size;
    }
    Ok(())
}

/// ALACSpecificConfig, after the box's version and flags: frame length (u32), compatible version,
/// bit depth, three tuning bytes, channel count.
fn alac_cookie(source: &mut (impl Read + Seek), body: u64) -> Result<(), TranscodeError> {
    let Some(config) = read_at::<16>(source, body)? else {
        return Err(corrupt("the ALAC configuration is cut short".into()));
    };
    let frame = u32_at(&config, 4);
    let (depth, channels) = (config[9], config[13]);
    if frame == 0 || frame > MAX_ALAC_FRAME {
        return Err(corrupt(format!("the ALAC frame length {frame} is not one an encoder writes")));
    }
    if !matches!(depth, 16 | 20 | 24 | 32) || channels == 0 || channels > 8 {
        return Err(corrupt(format!("ALAC with {depth}-bit samples in {channels} channels")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn boxed(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32 + 8).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        out
    }

    /// An M4A skeleton: ftyp, then moov/trak/mdia/minf/stbl around `tables`.
    fn m4a(tables: &[Vec<u8>]) -> Vec<u8> {
        let stbl = boxed(b"stbl", &tables.concat());
        let moov = boxed(b"moov", &boxed(b"trak", &boxed(b"mdia", &boxed(b"minf", &stbl))));
        [boxed(b"ftyp", b"M4A \0\0\0\0"), moov].concat()
    }

    fn stsc(count: u32, entries: usize) -> Vec<u8> {
        let mut body = vec![0; 4];
        body.extend_from_slice(&count.to_be_bytes());
        body.extend(std::iter::repeat_n(0, entries * 12));
        boxed(b"stsc", &body)
    }

    fn alac(frame: u32) -> Vec<u8> {
        alac_entry(frame, 0)
    }

    /// An ALAC sample entry of `version` (its fixed fields are longer in versions 1 and 2).
    fn alac_entry(frame: u32, version: u8) -> Vec<u8> {
        let mut config = vec![0; 4];
        config.extend_from_slice(&frame.to_be_bytes());
        config.extend_from_slice(&[0, 16, 40, 10, 14, 2, 0, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 172, 68]);
        let mut fields = vec![0; 28 + [0, 16, 36][usize::from(version)]];
        fields[9] = version;
        let entry = [fields, boxed(b"alac", &config)].concat();
        let mut stsd = vec![0, 0, 0, 0, 0, 0, 0, 1];
        stsd.extend(boxed(b"alac", &entry));
        boxed(b"stsd", &stsd)
    }

    fn checked(file: Vec<u8>) -> Result<(), TranscodeError> {
        check(&mut Cursor::new(file))
    }

    #[test]
    fn tables_that_fit_their_boxes_pass() {
        checked(m4a(&[stsc(2, 2), stsc(0, 0), alac(4096)])).unwrap();
        // A chapter track's text entry is not audio: symphonia passes over it, and so does the walk.
        let text = boxed(
            b"stsd",
            &[vec![0, 0, 0, 0, 0, 0, 0, 1], boxed(b"tx3g", &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1])].concat(),
        );
        checked(m4a(&[text])).unwrap();
        // A sample size for all samples means stsz has no entries, whatever its count.
        let stsz = boxed(b"stsz", &[0, 0, 0, 0, 0, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFF]);
        checked(m4a(&[stsz])).unwrap();
        // Anything before the first `ftyp` is not symphonia's to read, so not ours.
        checked([b"junk".to_vec(), m4a(&[stsc(1, 1)])].concat()).unwrap();
    }

    #[test]
    fn a_count_past_its_box_or_a_huge_alac_frame_is_corrupt() {
        let err = checked(m4a(&[stsc(u32::MAX, 1)])).unwrap_err();
        assert!(matches!(&err, TranscodeError::Corrupt(m) if m.contains("4294967295 entries")), "{err}");
        assert!(matches!(checked(m4a(&[stsc(3, 2)])), Err(TranscodeError::Corrupt(_))));
        let stsz = boxed(b"stsz", &[0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(matches!(checked(m4a(&[stsz])), Err(TranscodeError::Corrupt(_))));
        // A sample larger than the file, in the table or as the size of all samples.
        let stsz = boxed(b"stsz", &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F, 0, 0, 0]);
        assert!(matches!(checked(m4a(&[stsz])), Err(TranscodeError::Corrupt(_))));
        let stsz = boxed(b"stsz", &[0, 0, 0, 0, 0x7F, 0, 0, 0, 0, 0, 0, 1]);
        assert!(matches!(checked(m4a(&[stsz])), Err(TranscodeError::Corrupt(_))));
        // A fragment whose run names a sample larger than the file.
        let trun = boxed(b"trun", &[0, 0, 2, 0, 0, 0, 0, 1, 0x7F, 0, 0, 0]);
        let moof = boxed(b"moof", &boxed(b"traf", &trun));
        assert!(matches!(checked([m4a(&[]), moof].concat()), Err(TranscodeError::Corrupt(_))));
        let trun = boxed(b"trun", &[0, 0, 2, 0, 0, 0, 0, 1, 0, 0, 0, 4]);
        checked([m4a(&[]), boxed(b"moof", &boxed(b"traf", &trun))].concat()).unwrap();
        // Optional fields that the box is too short for.
        let trun = boxed(b"trun", &[0, 0, 2, 5, 0, 0, 0, 1]);
        assert!(checked([m4a(&[]), boxed(b"moof", &boxed(b"traf", &trun))].concat()).is_err());
        // A handler box too small for its fixed fields (symphonia subtracts them unchecked).
        assert!(matches!(checked(m4a(&[boxed(b"hdlr", &[0; 8])])), Err(TranscodeError::Corrupt(_))));
        // A child that claims more than its parent holds.
        let mut long = stsc(1, 1);
        long[3] += 100;
        assert!(matches!(checked(m4a(&[long])), Err(TranscodeError::Corrupt(_))));
        // A moov that claims more than the file holds still has its tables read up to the end.
        let mut file = m4a(&[stsc(u32::MAX, 1)]);
        let moov = file.windows(4).position(|w| w == b"moov").unwrap() - 4;
        file[moov + 3] += 1;
        assert!(matches!(checked(file), Err(TranscodeError::Corrupt(_))));
        assert!(matches!(checked(m4a(&[alac_entry(u32::MAX, 1)])), Err(TranscodeError::Corrupt(_))));
        checked(m4a(&[alac_entry(4096, 2)])).unwrap();
        let err = checked(m4a(&[alac(u32::MAX)])).unwrap_err();
        assert!(matches!(&err, TranscodeError::Corrupt(m) if m.contains("frame length")), "{err}");
    }
}
