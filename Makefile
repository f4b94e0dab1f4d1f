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

.PHONY: run test deps compare-deps bench compare token

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

test: deps
	$(CARGO) test --workspace --all-targets

bench: deps
	$(CARGO) bench -p benches

compare: compare-deps
	benches/compare/images.sh
	benches/compare/audio.sh
	benches/compare/video.sh
	benches/compare/edge.sh
