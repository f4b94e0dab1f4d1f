//! Replays every seed, fixture and past finding through the fuzz targets' bodies, so `make test`
//! catches a regression of anything the fuzzers ever found without running libFuzzer.
//!
//! Inputs per target: `fuzz/seeds/{target}/` (checked in), `fuzz/regressions/{target}/` (each
//! finding that was fixed, kept under the name of what it broke) and the repository's `fixtures/`
//! for the targets that read whole files. (Not what `make fuzz` grew in `fuzz/corpus/`: it may hold
//! inputs that only a build with overflow checks trips over in a dependency; see the Makefile.)

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use transcode::{TranscodeError, audio};

/// Targets that read whole uploads also take every fixture file as a seed.
const READS_FILES: [&str; 4] = ["sniff", "image_probe", "exif_orientation", "audio_probe"];

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable folder entry").path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|x| x != "md" && x != "py"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_seed_fixture_and_finding_passes_every_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = fuzz.parent().expect("the fuzz crate sits in the workspace");
    let mut failures = Vec::new();
    for (name, body) in courier_fuzz::TARGETS {
        let seeds = files(&fuzz.join("seeds").join(name));
        assert!(seeds.len() >= 3, "{name}: only {} checked-in seeds", seeds.len());
        let mut inputs = seeds;
        inputs.extend(files(&fuzz.join("regressions").join(name)));
        if READS_FILES.contains(&name) {
            inputs.extend(files(&root.join("fixtures")));
        }
        for input in inputs {
            let bytes = std::fs::read(&input).expect("a readable input");
            if catch_unwind(AssertUnwindSafe(|| body(&bytes))).is_err() {
                failures.push(format!("{name}: {}", input.display()));
            }
        }
    }
    assert!(failures.is_empty(), "inputs that fail their target:\n{}", failures.join("\n"));
}

#[test]
fn every_hostile_audio_finding_is_refused_as_corrupt() {
    // Not panicking is not enough: a table bomb whose allocation happened to succeed would pass
    // that. Each must be refused, as the container it claims to be, before a demuxer sizes
    // anything from it or trips over it.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions/audio_probe");
    let findings = files(&dir);
    assert!(findings.len() >= 6, "the audio findings are missing from {}", dir.display());
    for file in findings {
        let container = match file.extension().and_then(|e| e.to_str()) {
            Some("m4a") => audio::Container::Mp4,
            Some("webm") => audio::Container::WebM,
            other => panic!("{}: no container for .{other:?}", file.display()),
        };
        let bytes = std::fs::read(&file).unwrap();
        let probed = audio::probe(Cursor::new(bytes), container, &audio::Limits::default());
        assert!(matches!(probed, Err(TranscodeError::Corrupt(_))), "{}: {probed:?}", file.display());
    }
}
