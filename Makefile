# Courier's two commands: `make run` and `make test`. Both install the Debian packages the build
# needs when they are missing (apt-get update once, then install), then build.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Build needs: pkg-config, and cmake + nasm for libjpeg-turbo (built with SIMD by turbojpeg-sys);
# libopus for voice notes; Debian's libav* (with libx264) for video, and libclang for ffmpeg-sys's
# bindgen; the ffmpeg package for ffprobe, which the tests check outputs with.
BUILD_PACKAGES := pkg-config cmake nasm g++ libopus-dev libclang-dev ffmpeg \
	libavcodec-dev libavformat-dev libavfilter-dev libavutil-dev libswscale-dev libswresample-dev
# Comparison scripts need the peers they compare with.
COMPARE_PACKAGES := libvips-tools time nginx-light wrk curl

.PHONY: run test test-deps deps compare-deps bench compare token fuzz fuzz-deps

define install_missing
	@missing=""; for p in $(1); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call install_missing,$(BUILD_PACKAGES))

compare-deps: deps
	$(call install_missing,$(COMPARE_PACKAGES))

run: deps
	$(CARGO) run --bin courier -- serve --listen 127.0.0.1:8080 --data-dir ./data

token: deps
	@$(CARGO) run -q --bin courier -- token --data-dir ./data --user $${USER_NAME:-alice}

# The resumable-upload tests drive the server with tus-js-client under Node (installed from npm
# into server/tests/js, pinned by its lock file).
test-deps: deps
	@command -v npm >/dev/null || { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends nodejs npm; }
	npm ci --prefix server/tests/js --no-audit --no-fund --loglevel=error

test: test-deps
	$(CARGO) test --workspace --all-targets

bench: deps
	$(CARGO) bench -p benches

compare: compare-deps
	benches/compare/images.sh
	benches/compare/audio.sh
	benches/compare/video.sh
	benches/compare/edge.sh

# Fuzzing: each target of fuzz/ runs for FUZZ_SECONDS under libFuzzer (cargo-fuzz, on the nightly
# toolchain it needs), starting from its checked-in seeds and, for the file parsers, fixtures/.
# What it grows is kept in fuzz/corpus/ (ignored by git); a finding lands in fuzz/artifacts/ and,
# once fixed, belongs in fuzz/regressions/{target}/, which `make test` replays.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= sniff image_probe exif_orientation audio_probe byte_range signed_query
FUZZ_FILE_TARGETS := sniff image_probe exif_orientation audio_probe
# Targets built as the worker runs them, without overflow checks: symphonia-codec-aac 0.5.5 computes
# an ADTS stream's length as `len - start - start`, which panics with overflow checks on (a tag
# larger than the audio after it) and wraps to "no estimate" in a release build.
FUZZ_RELEASE_TARGETS := audio_probe

fuzz-deps: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal

fuzz: fuzz-deps
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		seeds="fuzz/seeds/$$t"; \
		case " $(FUZZ_FILE_TARGETS) " in *" $$t "*) seeds="$$seeds fixtures";; esac; \
		echo "== fuzzing $$t for $(FUZZ_SECONDS) s"; \
		mode=""; case " $(FUZZ_RELEASE_TARGETS) " in *" $$t "*) mode="-O";; esac; \
		$(CARGO) +nightly fuzz run $$mode --fuzz-dir fuzz --features libfuzzer $$t fuzz/corpus/$$t $$seeds -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10; \
	done
