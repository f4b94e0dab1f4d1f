#!/bin/sh
# Regenerates the checked-in seeds: tiny, valid inputs of every kind each target parses, so the
# fuzzers start from the formats' real structure. Needs the ffmpeg CLI and python3.
set -eu
cd "$(dirname "$0")"
ff() { ffmpeg -hide_banner -loglevel error -y "$@"; }

# Images, 3×2 pixels.
for ext in jpg png gif webp; do ff -f lavfi -i color=red:s=3x2 -frames:v 1 "image_probe/tiny.$ext"; done
ff -f lavfi -i color=blue:s=2x2 -frames:v 1 -pix_fmt rgba image_probe/rgba.png

# Voice-note inputs, 0.2 s of a tone.
tone="-f lavfi -i sine=frequency=440:sample_rate=8000:duration=0.2"
ff $tone audio_probe/tone.wav
ff $tone -c:a aac -b:a 16k audio_probe/tone.m4a
ff $tone -c:a aac -b:a 16k -f adts audio_probe/tone.aac
ff $tone -ar 16000 -c:a libmp3lame -b:a 16k audio_probe/tone.mp3 2>/dev/null || ff $tone -ar 16000 -c:a mp3 audio_probe/tone.mp3
ff $tone audio_probe/tone.flac
ff $tone -c:a libopus -b:a 12k audio_probe/tone.ogg
ff $tone -c:a libopus -b:a 12k -f webm audio_probe/tone.webm

python3 - <<'PY'
import struct

def tiff(orientation):
    # Little-endian TIFF with one IFD entry: Orientation (0x0112), SHORT, 1 value.
    return b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + b"\0\0\0\0"

def jpeg_with_exif(orientation):
    payload = b"Exif\0\0" + tiff(orientation)
    return b"\xff\xd8" + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + b"\xff\xd9"

def png_with_exif(orientation):
    import zlib
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"eXIf", tiff(orientation)) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")

open("exif_orientation/jpeg-6", "wb").write(jpeg_with_exif(6))
open("exif_orientation/jpeg-3", "wb").write(jpeg_with_exif(3))
open("exif_orientation/png-8", "wb").write(png_with_exif(8))
open("exif_orientation/tiff-2", "wb").write(tiff(2))

heads = {
    "jpeg": b"\xff\xd8\xff\xe0\0\x10JFIF\0",
    "png": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
    "gif": b"GIF89a\x01\0\x01\0",
    "webp": b"RIFF\x24\0\0\0WEBPVP8 ",
    "mp4": b"\0\0\0\x18ftypisom\0\0\x02\0isomiso2",
    "mov": b"\0\0\0\x08wide\0\0\0\x10mdat",
    "ebml": b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01",
    "ogg": b"OggS\0\x02\0\0\0\0\0\0\0\0",
    "wav": b"RIFF\x24\0\0\0WAVEfmt ",
    "flac": b"fLaC\0\0\0\x22",
    "id3": b"ID3\x04\0\0\0\0\0\0",
    "adts": b"\xff\xf1\x50\x80\x02\x1f\xfc",
    "mpeg": b"\xff\xfb\x90\x64\0",
    "short": b"\xff",
}
for name, head in heads.items():
    open(f"sniff/{name}", "wb").write(head)

ranges = [(100, 0, b"bytes=0-99"), (100, 0, b"bytes=-5"), (100, 0, b"bytes=95-"), (100, 0, b"bytes=0-1,3-4"),
          (100, 0, b"bytes=100-200"), (100, 1, b"bytes=0-9"), (0, 0, b"bytes=0-0"), (2**64 - 1, 0, b"bytes=18446744073709551614-")]
for i, (length, flags, value) in enumerate(ranges):
    open(f"byte_range/{i}", "wb").write(struct.pack("<Q", length) + bytes([flags]) + value)

queries = [b"exp=1767225600&sig=2m2TtKiaYr0sKxeDm0Ejpo8ePwHjMdFtmjzFXKRHTYE", b"exp=1%37&sig=a+b%2Fc", b"exp=1&exp=2&sig=x",
           b"sig=&exp=", b"a=b&&exp=0&sig=AAAA", b"exp"]
for i, query in enumerate(queries):
    open(f"signed_query/{i}", "wb").write(query)
PY
