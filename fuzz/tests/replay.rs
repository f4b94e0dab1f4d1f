//! Replays every seed, fixture and past finding through the fuzz targets' bodies, so `make test`
//! catches a regression of anything the fuzzers ever found without running libFuzzer.
//!
//! Inputs per target: `fuzz/seeds/{target}/` (checked in), `fuzz/regressions/{target}/` (each
//! finding that was fixed, kept under the name of what it broke), the repository's `fixtures/`
//! for the targets that read whole files, and `fuzz/corpus/{target}/` when `make fuzz` has grown
//! one on this machine.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

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
        inputs.extend(files(&fuzz.join("corpus").join(name)));
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
