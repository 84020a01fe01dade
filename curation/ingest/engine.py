"""The ingest engine: RAW batches from any reader -> validated, deduplicated lake rows.

Every row read ends in exactly one place: `pairs` (accepted), the duplicate count (its pair_id
was already in the lake or earlier in the same file), or `quarantine` (with a reason code and
the raw values). The counts are stored in the `ingests` row and always satisfy
read = accepted + duplicates + quarantined.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
import re
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from prefcurate.curation.store import ids
from prefcurate.curation.ingest import rules
from prefcurate.curation.ingest.raw import UnreadableSourceError, raw_summary
from prefcurate.curation.store.lake import Lake, check_partition_name


VERSION = "0.1.0"

# Pillow's own decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS, 1024**3 // 4 // 3, ~89.5 Mpx;
# ~256 MB of RGB): above it a header alone can make a decoder allocate gigabytes.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# Mean encoded size above which image hashing and checks run in the thread pool: hashlib and zlib.crc32
# release the GIL only for buffers of more than a few kB, and thread hand-offs cost ~10-50 us an image.
_THREADED_MEAN_BYTES = 64 << 10
# Mean image size above which content hashing is split over the threads: hashlib releases the GIL for
# buffers over 2 kB, and at 8 kB the hash (~8 us) outweighs the Python step per image that holds it.
_THREADED_HASH_MEAN_BYTES = 8 << 10
# Mean image size above which a batch's images are hashed where they lie, each occurrence, instead of
# dictionary-encoding the image columns first (see _Batcher._hash_images): at 8 kB a hash (~12 us) costs
# about what copying the image twice into fresh memory does, and in-batch repeats become rare.
_DIRECT_HASH_MEAN_BYTES = 8 << 10
# 8 kB of UTF-8: ~100x the 77-token text window of the CLIP-family scorers and T2I text encoders.
MAX_PROMPT_BYTES = 8 << 10


@dataclass
class IngestConfig:
    source: str                      # label stored in pairs.source and used in pair ids; e.g. "pickapic"
    format: str                      # reader: pickapic, hpdv2, jsonl, csv, wmt
    full_decode: bool = False        # header + end-marker check catches garbage and truncation; True also
                                     # decodes the pixels (several times slower, catches mid-stream damage)
    decode_threads: int = 2          # for full decodes and hashing big images (PIL and hashlib release the GIL)
    max_file_bytes: int = 256 << 20  # part files rotate at about this size, so no single file is huge
    max_image_pixels: int = MAX_IMAGE_PIXELS  # width x height from the header; above: image_too_large
    max_image_bytes: int = 64 << 20  # encoded bytes of one image (inline in the source); above: image_too_large
    max_prompt_bytes: int = MAX_PROMPT_BYTES  # above: prompt_too_long

    def __post_init__(self):
        for name in ("max_image_pixels", "max_image_bytes", "max_prompt_bytes", "max_file_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class IngestResult:
    ingest_id: str
    source_file: str
    already_ingested: bool
    n_read: int = 0
    n_accepted: int = 0
    n_duplicates: int = 0
    n_quarantined: int = 0
    n_images_new: int = 0
    reasons: Counter = field(default_factory=Counter)

    def check(self) -> None:
        total = self.n_accepted + self.n_duplicates + self.n_quarantined
        if total != self.n_read:  # an internal invariant: a bug, never user input
            raise AssertionError(f"{self.source_file}: read {self.n_read} != accepted+duplicates+quarantined {total}")

    def line(self) -> str:
        head = "already ingested, nothing to do: " if self.already_ingested else ""
        return (f"{head}{self.source_file}: read {self.n_read} = accepted {self.n_accepted} + duplicates "
                f"{self.n_duplicates} + quarantined {self.n_quarantined}; {self.n_images_new} new images")


class ImageTooLargeError(ValueError):
    """An image's header claims more pixels than the limit: it is refused before any decode."""


# A marker inside or after JPEG entropy-coded data: 0xFF followed by anything but a stuffed 0x00, a
# restart marker (D0-D7) or a fill byte (FF).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SEGMENT = struct.Struct(">BBH")  # 0xFF, marker, segment length (which counts itself, not the marker)
_JPEG_SIZE = struct.Struct(">HH")     # SOF: height, width, after the length and the sample precision


def _jpeg_walk(data: bytes) -> tuple[int, int]:
    """(width, height) of JPEG bytes from their frame header; raises ValueError naming the damage.

    One pass over the file: every marker segment (its length inside the file), and the entropy-coded
    data of every scan, where only stuffed bytes and restart markers may follow a 0xFF until the next
    segment; the file must end with EOI. Garbage written over the middle of a file almost always puts
    a reserved marker (0xFF02-0xFFBF) or a second SOI into a scan, where libjpeg fails or decodes
    rubbish. Costs one C regex scan per scan plus a few Python steps per header segment, not a decode."""
    pos, end, size = 2, len(data), None
    search, segment = _JPEG_MARKER.search, _JPEG_SEGMENT.unpack_from
    while True:
        if pos + 4 <= end:
            ff, marker, length = segment(data, pos)
        elif pos + 2 <= end:
            ff, marker, length = data[pos], data[pos + 1], 0
        else:
            raise ValueError("JPEG ends without its EOI marker (truncated)")
        if ff != 0xFF or marker == 0x00 or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            # between segments or inside a scan: skip to the next real marker
            found = search(data, pos + (ff == 0xFF))
            if found is None:
                raise ValueError("JPEG ends without its EOI marker (truncated)")
            pos = found.start()
            continue
        if marker == 0xD9:
            if size is None:
                raise ValueError("JPEG has no frame header")
            return size
        if marker == 0x01:  # TEM: no length
            pos += 2
            continue
        if marker == 0xD8 or marker <= 0xBF:
            raise ValueError(f"JPEG has an invalid marker 0xFF{marker:02X} at byte {pos} (damaged data)")
        if pos + 4 > end:
            raise ValueError("JPEG ends inside a segment header (truncated)")
        if length < 2 or pos + 2 + length > end:
            raise ValueError(f"JPEG segment 0xFF{marker:02X} at byte {pos} runs past the end of the file "
                             "(truncated or damaged)")
        if size is None and marker in _SOF_MARKERS and length >= 7:
            height, width = _JPEG_SIZE.unpack_from(data, pos + 5)
            if not width or not height:
                raise ValueError(f"JPEG frame header gives a size of {width}x{height}")
            size = (width, height)
        pos += 2 + length
        if marker == 0xDA:  # entropy-coded data follows: find the marker that ends it
            found = search(data, pos)
            if found is None:
                raise ValueError("JPEG ends without its EOI marker (truncated)")
            pos = found.start()


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Lookup tables by the byte after 0xFF (index 0-255).
_NOT_A_MARKER = np.zeros(256, bool)   # stuffed byte, restart marker or fill byte: _JPEG_MARKER skips these
_NOT_A_MARKER[[0x00, *range(0xD0, 0xD8), 0xFF]] = True
_IS_SOF = np.zeros(256, bool)
_IS_SOF[sorted(_SOF_MARKERS)] = True


def _jpeg_walk_many(data: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                    max_steps: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """_jpeg_walk over many JPEGs at once, as numpy steps over all of them: (ok, width, height).

    data: uint8, the bytes of all images back to back (an Arrow binary array's data buffer); image k is
    data[starts[k]:ends[k]] and begins with SOI (FF D8). Step s advances every image by its s-th marker
    segment (or scan), so the cost is ~20 array operations per segment of the longest header, not Python
    per image. The markers that end entropy-coded data are found once for the whole buffer (every 0xFF
    whose next byte is not in _NOT_A_MARKER: exactly where _JPEG_MARKER matches) and looked up with
    searchsorted. ok[k] is True only where _jpeg_walk(image k) returns (width[k], height[k]); where it
    would raise, or the image has more than `max_steps` segments, ok[k] is False and the caller runs the
    scalar walk, which names the damage. So the results never differ from the scalar walk's."""
    n, size = len(starts), len(data)
    width, height = np.zeros(n, np.int64), np.zeros(n, np.int64)
    ok, have_size = np.zeros(n, bool), np.zeros(n, bool)
    if n == 0 or size < 2:
        return ok, width, height
    step = 4 << 20  # the 0xFF search in 4 MB pieces: no byte-sized temporary of the whole buffer
    ff_at = np.concatenate([np.flatnonzero(data[a:min(a + step, size - 1)] == 0xFF) + a
                            for a in range(0, size - 1, step)])
    markers = ff_at[~_NOT_A_MARKER[data[ff_at + 1]]]
    last = size - 1

    def byte(at: np.ndarray) -> np.ndarray:  # data[at] as int64, reads past the end clamped (masked by callers)
        return data[np.minimum(at, last)].astype(np.int64)

    def next_marker(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position, found) of the first marker at or after `start` with its second byte before `end`."""
        i = np.searchsorted(markers, start)
        found = i < len(markers)
        at = markers[np.minimum(i, len(markers) - 1)] if len(markers) else np.zeros_like(start)
        found &= at + 1 < end
        return at, found

    pos = starts.astype(np.int64) + 2
    ends = ends.astype(np.int64)
    active = np.arange(n)
    for _ in range(max_steps):
        if active.size == 0:
            break
        p, e = pos[active], ends[active]
        ff, marker = byte(p), byte(p + 1)
        whole_header = p + 4 <= e
        length = np.where(whole_header, (byte(p + 2) << 8) | byte(p + 3), 0)
        fail = p + 2 > e
        skip = ~fail & ((ff != 0xFF) | _NOT_A_MARKER[marker])  # between segments or inside a scan
        segment = ~fail & ~skip
        eoi = segment & (marker == 0xD9)
        done = eoi & have_size[active]
        fail |= eoi & ~have_size[active]
        tem = segment & (marker == 0x01)
        segment &= ~eoi & ~tem
        bad = segment & ((marker == 0xD8) | (marker <= 0xBF) | ~whole_header | (length < 2) | (p + 2 + length > e))
        fail |= bad
        segment &= ~bad
        sof = segment & ~have_size[active] & _IS_SOF[marker] & (length >= 7)
        h, w = (byte(p + 5) << 8) | byte(p + 6), (byte(p + 7) << 8) | byte(p + 8)
        zero = sof & ((w == 0) | (h == 0))
        fail |= zero
        segment &= ~zero
        sof &= ~zero
        height[active[sof]], width[active[sof]] = h[sof], w[sof]
        have_size[active[sof]] = True
        new = np.where(tem, p + 2, np.where(segment, p + 2 + length, p))
        search = skip | (segment & (marker == 0xDA))  # a scan's entropy-coded data follows SOS
        if search.any():
            at, found = next_marker(np.where(skip, p + (ff == 0xFF), new)[search], e[search])
            new[search] = at
            lost = np.zeros_like(search)
            lost[search] = ~found
            fail |= lost
        ok[active[done]] = True
        pos[active] = new
        active = active[~(done | fail)]
    return ok, width, height


def _jpeg_problem(data: bytes) -> str | None:
    """Why JPEG bytes are damaged (see _jpeg_walk), or None."""
    try:
        _jpeg_walk(data)
    except ValueError as exc:
        return str(exc)
    return None


def _png_problem(data: bytes) -> str | None:
    """Why PNG bytes are damaged, or None: every chunk lies inside the file and matches its CRC-32
    (PNG spec, section 5.3), there is image data, and IEND comes last. A flipped byte anywhere in
    the file fails a CRC, at memory speed (zlib.crc32), without inflating the pixels."""
    view, pos, end, has_data = memoryview(data), 8, len(data), False
    while pos + 12 <= end:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = bytes(view[pos + 4:pos + 8])
        if pos + 12 + length > end:
            return f"PNG chunk {kind.decode('latin-1')!r} at byte {pos} runs past the end of the file (truncated)"
        stored_crc = int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big")
        if zlib.crc32(view[pos + 4:pos + 8 + length]) != stored_crc:
            return f"PNG chunk {kind.decode('latin-1')!r} at byte {pos} fails its CRC (damaged data)"
        has_data = has_data or kind == b"IDAT"
        if kind == b"IEND":
            return None if has_data else "PNG has no IDAT image data"
        pos += 12 + length
    return "PNG ends without its IEND chunk (truncated)"


def _complete(fmt: str, data: bytes) -> str | None:
    """Why encoded bytes are structurally damaged, or None. JPEG and PNG are walked whole (see
    _jpeg_problem, _png_problem); WebP and GIF get their end-marker check, which catches truncation
    (the common corruption of scraped and copied images) without decoding the pixels."""
    if fmt == "JPEG":
        return _jpeg_problem(data)
    if fmt == "PNG":
        return _png_problem(data)
    if fmt == "WEBP":
        declared = int.from_bytes(data[4:8], "little") + 8
        return None if declared <= len(data) else f"WebP declares {declared} bytes but has {len(data)} (truncated)"
    if fmt == "GIF":
        complete = bytes(data[-64:]).rstrip(b"\x00").endswith(b"\x3b")
        return None if complete else "GIF ends without its trailer (truncated)"
    return "unchecked"


def _fast_header(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) read straight from a JPEG or PNG header, or None for anything else
    (PIL then parses it). PIL's JPEG header parsing costs ~150 us an image in Python; walking the
    marker segments to the frame header costs a few."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return "PNG", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 9 > end:
                return None
            height = int.from_bytes(data[pos + 5:pos + 7], "big")
            width = int.from_bytes(data[pos + 7:pos + 9], "big")
            return ("JPEG", width, height) if width and height else None
        if marker == 0xDA or length < 2:  # scan data before any frame header: leave it to PIL
            return None
        pos += 2 + length
    return None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{width}x{height} = {width * height} pixels, more than the limit of {max_pixels}")


def inspect_image(data: bytes, full_decode: bool = False,
                  max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, int, int]:
    """(format, width, height) of encoded image bytes; raises ImageTooLargeError if the header claims
    more than `max_pixels` (before anything is decoded), ValueError (or PIL's error) if the bytes
    are not a complete image.

    Default: parse the header (format, size) and check the file's structure (JPEG markers and
    segment lengths, PNG chunk CRCs, WebP/GIF end markers). That catches garbage, truncation and
    damage inside JPEG/PNG files at a small fraction of the cost of decoding. `full_decode=True`
    also decodes the pixels (JPEGs in draft mode: DCT scaling to ~1/8 size still reads the whole
    entropy stream); formats without a structure check are always fully decoded."""
    if isinstance(data, memoryview) and data.format != "B":
        data = data.cast("B")  # the walks index bytes as 0-255
    if not full_decode and data[:2] == b"\xff\xd8":
        width, height = _jpeg_walk(data)  # header and structure in one pass
        _check_pixels(width, height, max_pixels)
        return "JPEG", width, height
    header = None if full_decode else _fast_header(data)
    if header is not None:
        _check_pixels(header[1], header[2], max_pixels)  # before the CRC pass: a bomb costs nothing more
        problem = _complete(header[0], data)
        if problem is not None:
            raise ValueError(problem)
        return header
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own guard (2x its limit) fired at open
        raise ImageTooLargeError(_describe(exc)) from None
    with im:
        fmt, (width, height) = im.format or "UNKNOWN", im.size
        _check_pixels(width, height, max_pixels)
        problem = _complete(fmt, data)
        if problem not in (None, "unchecked"):
            raise ValueError(problem)
        if full_decode or problem == "unchecked":
            if fmt == "JPEG":
                im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            im.load()
    return fmt, width, height


_ADDRESS = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


def _describe(exc: BaseException) -> str:
    """'ExceptionName: message' with object reprs ('<_io.BytesIO object at 0x7f...>') removed, so the
    same input always gives the same quarantine detail."""
    text = _ADDRESS.sub("", str(exc)).replace("  ", " ").strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _file_sha256(fs, fs_path: str, stop: threading.Event, chunk_bytes: int = 8 << 20) -> str | None:
    """sha256 of the file's bytes (what ids.file_fingerprint computes), read into one reused buffer (no
    fresh 8 MB allocation per chunk); None if `stop` is set before the end."""
    digest, buffer = hashlib.sha256(), bytearray(chunk_bytes)
    view = memoryview(buffer)
    with fs.open(fs_path, "rb") as f:
        readinto = getattr(f, "readinto", None)
        while not stop.is_set():
            if readinto is not None:
                n = readinto(view)
                if not n:
                    return digest.hexdigest()
                digest.update(view[:n])
            else:
                chunk = f.read(chunk_bytes)
                if not chunk:
                    return digest.hexdigest()
                digest.update(chunk)
    return None


def _known_ids(lake: Lake, table: str, column: str, partition: str | None = None) -> set[str]:
    files = lake.files(table)
    if partition is not None:
        files = [f for f in files if f"/{table}/{partition}/" in f]
    known: set[str] = set()
    for f in files:
        known.update(pq.read_table(f, columns=[column], filesystem=lake.fs).column(0).to_pylist())
    return known


def _existing_ingest(lake: Lake, ingest_id: str) -> dict | None:
    for f in lake.files("ingests"):
        rows = pq.read_table(f, filesystem=lake.fs).to_pylist()
        for row in rows:
            if row["ingest_id"] == ingest_id:
                return row
    return None


def _binary_views(array: pa.Array) -> list[memoryview]:
    """The values of a binary array as memoryviews of its data buffer (zero-copy; a null slot's view is
    whatever its offsets span, usually empty: callers skip nulls)."""
    if len(array) == 0:
        return []
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset:array.offset + len(array) + 1]
    data = memoryview(array.buffers()[2] or b"").cast("B")  # Arrow exports signed bytes ('b'): index as 0-255
    return [data[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


_PAIR_COLUMNS = ["split", "prompt", "image_0_uid", "image_1_uid", "label_0", "user_id", "created_at", "model_0",
                 "model_1", "ranking_id"]  # the RAW columns `pairs` keeps as they are


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array (zero-copy when it has one chunk, as a reader's batch columns do)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _int64_array(values: np.ndarray) -> pa.Array:
    """An Arrow int64 array over a numpy array's memory. (pa.array(ndarray) would import numpy.ma, ~40 ms,
    the first time it runs in a process.)"""
    values = np.ascontiguousarray(values, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _repeat(value: str, n: int) -> pa.Array:
    """A string array of `n` copies of `value` (the per-batch constant columns)."""
    return pa.repeat(pa.scalar(value, pa.string()), n)


def _spans(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(data, offsets) of a binary array as numpy, zero-copy: uint8 bytes and int64 offsets (n + 1);
    value k is data[offsets[k]:offsets[k + 1]]."""
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset:array.offset + len(array) + 1]
    return np.frombuffer(array.buffers()[2] or b"", np.uint8), offsets.astype(np.int64)


class _BatchImages:
    """The distinct images of one batch, each left where it lies: image k is value `position[k]` of
    `arrays[array_of[k]]` (binary arrays: the batch's dictionary of distinct images, or its two image
    columns), with content id `hashes[k]` (hex) and a memoryview of its bytes `views[k]`."""

    def __init__(self, arrays: list[pa.Array], array_of: np.ndarray, position: np.ndarray, hashes: list[str],
                 views: list[memoryview]):
        self.arrays, self.array_of, self.position = arrays, array_of, position
        self.hashes, self.views = hashes, views

    def index(self) -> dict[str, int]:
        return dict(zip(self.hashes, range(len(self.hashes))))

    def spans(self, ks: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """For the images ks (int64 indices into hashes), per array holding some: (ks there, data, starts, ends),
        image ks[j] being data[starts[j]:ends[j]] (for the vectorised checks)."""
        for a, array in enumerate(self.arrays):
            here = ks[self.array_of[ks] == a]
            if len(here):
                data, offsets = _spans(array)
                rows = self.position[here]
                yield here, data, offsets[rows], offsets[rows + 1]

    def take(self, ks: list[int]) -> pa.Array:
        """The bytes of images ks, in that order (one binary array; a copy in C)."""
        ks = np.asarray(ks, np.int64)
        parts, order = [], []
        for a, array in enumerate(self.arrays):
            here = np.flatnonzero(self.array_of[ks] == a)
            if len(here) or not parts:
                parts.append(array.take(_int64_array(self.position[ks[here]])))
                order.append(here)
        taken = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
        order = np.concatenate(order)
        if np.array_equal(order, np.arange(len(ks))):
            return taken
        return taken.take(_int64_array(np.argsort(order)))  # back to the order of ks


class _Batcher:
    """Per-ingest state: what is already known, and the decode pool."""

    def __init__(self, lake: Lake, config: IngestConfig, ingest_id: str, source_file: str):
        self.config = config
        self.ingest_id = ingest_id
        self.source_file = source_file
        self.known_pairs = _known_ids(lake, "pairs", "pair_id", partition=config.source)
        self.known_images = _known_ids(lake, "images", "image_id")
        self.known_refs = _known_ids(lake, "image_refs", "ref_id")
        self.prompt_ids: dict[str, str] = {}  # prompts repeat across pairs: normalize and hash each once
        # content id -> (reason, detail) of a refused image, so a bad image is inspected once
        self.bad_images: dict[str, tuple[str, str]] = {}
        self.pool = ThreadPoolExecutor(max(1, config.decode_threads))

    def _decode_new(self, images: "_BatchImages") -> dict[str, tuple[str, int, int]]:
        """Check the images not seen before; remember failures. Returns id -> (format, w, h).

        JPEGs within the byte limit go through the vectorised walk (_jpeg_walk_many) together; the rest,
        and every JPEG it does not accept, through the scalar inspect_image (which names the damage)."""
        todo = [k for k, image_id in enumerate(images.hashes)
                if image_id not in self.known_images and image_id not in self.bad_images]
        results = {}
        config = self.config
        if todo and not config.full_decode:
            k = np.asarray(todo, np.int64)
            accepted = np.zeros(len(k), bool)
            for here, data, starts, ends in images.spans(k):
                jpeg = (ends - starts >= 2) & (ends - starts <= config.max_image_bytes)
                at = np.minimum(starts, max(len(data) - 2, 0))
                jpeg &= (data[at] == 0xFF) & (data[at + 1] == 0xD8) if len(data) >= 2 else False
                walked, width, height = _jpeg_walk_many(data, starts[jpeg], ends[jpeg])
                fine = walked & (width * height <= config.max_image_pixels)
                for j, w, h in zip(here[jpeg][fine].tolist(), width[fine].tolist(), height[fine].tolist()):
                    results[images.hashes[j]] = ("JPEG", w, h)
                accepted[np.isin(k, here[jpeg][fine])] = True
            todo = k[~accepted].tolist()

        def run(index):
            image_id, data = images.hashes[index], images.views[index]
            if len(data) > config.max_image_bytes:
                return image_id, None, ("image_too_large", f"{len(data)} bytes, more than the limit of "
                                                           f"{config.max_image_bytes}")
            try:
                return image_id, inspect_image(data, config.full_decode, config.max_image_pixels), None
            except ImageTooLargeError as exc:
                return image_id, None, ("image_too_large", str(exc))
            except Exception as exc:  # any decoder failure means the bytes are unusable
                return image_id, None, ("corrupt_image", _describe(exc))

        # Threads pay for full decodes and for big images (hashlib and zlib.crc32 release the GIL on large
        # buffers); the structure walk of small images is GIL-bound Python, faster in this thread.
        big = bool(todo) and sum(len(images.views[k]) for k in todo) > len(todo) * _THREADED_MEAN_BYTES
        mapper = self.pool.map if self.config.full_decode or big else map
        for image_id, meta, error in mapper(run, todo):
            if error is None:
                results[image_id] = meta
            else:
                self.bad_images[image_id] = error
        return results

    def process(self, raw: pa.Table, result: IngestResult) -> dict[str, pa.Table]:
        """Split one RAW batch into accepted pairs, duplicates and quarantined rows.

        The checks (prefcurate.curation.ingest.rules) run as Arrow kernels over the whole batch; Python sees only
        the rows they quarantine (for the detail texts). The bulky columns (image bytes, timestamps)
        reach the output through Arrow `take`, never through Python."""
        result.n_read += raw.num_rows
        content, images = self._hash_images(raw)
        decoded = self._decode_new(images)

        ok, quarantine = self._quarantine(raw, content, result)
        all_ok = bool(ok.all())
        ok_rows = _int64_array(np.flatnonzero(ok))

        # A duplicate pair may still bring images the lake lacks (the with-images shard of pairs
        # first ingested metadata-only), so images and refs are stored for every valid row.
        new_images, new_refs = self._new_images_and_refs(raw, ok_rows, all_ok, content, images, decoded)
        pair_ids, accepted = self._new_pair_ids(raw.column("row_identity"), ok_rows, all_ok, result)
        result.n_accepted += len(pair_ids)
        result.n_images_new += len(new_images)
        rows = ok_rows if accepted is None else _int64_array(np.asarray(accepted, np.int64))
        pairs = self._pairs(raw, content, None if all_ok and accepted is None else rows, pair_ids)
        return {"pairs": pairs, "quarantine": pa.Table.from_pylist(quarantine), "images": new_images,
                "image_refs": new_refs}

    def _new_pair_ids(self, identity: pa.ChunkedArray, ok_rows: pa.Array, all_ok: bool, result: IngestResult
                      ) -> tuple[list[str], list[int] | None]:
        """(pair ids of the valid rows not seen before, in row order; those rows' indices, or None when
        they are all the valid rows). Counts the others as duplicates and remembers the new ids."""
        if not all_ok:
            identity = identity.take(ok_rows)
        # ids.pair_id, inlined: this runs once per row
        prefix, blake2b = f"{self.config.source}|", hashlib.blake2b
        pair_ids = [blake2b((prefix + r).encode("utf-8"), digest_size=16).hexdigest() for r in identity.to_pylist()]
        known, distinct = self.known_pairs, set(pair_ids)
        if len(distinct) == len(pair_ids) and known.isdisjoint(distinct):
            known.update(distinct)  # every valid row is new (the common case): no per-row loop
            return pair_ids, None
        accepted, fresh = [], []
        for i, pid in zip(ok_rows.to_pylist(), pair_ids):
            if pid in known:
                result.n_duplicates += 1
                continue
            known.add(pid)
            accepted.append(i)
            fresh.append(pid)
        return fresh, accepted

    def _pairs(self, raw: pa.Table, content: list[pa.Array], rows: pa.Array | None, pair_ids: list[str]) -> pa.Table:
        """The `pairs` rows of the batch's `rows` (all rows if None), whose ids are `pair_ids`. Only the
        columns `pairs` keeps are taken (the image bytes stay where they are)."""
        source, m = self.config.source, len(pair_ids)
        kept, hashes = raw.select(_PAIR_COLUMNS), content
        if rows is not None:
            kept, hashes = kept.take(rows), [c.take(rows) for c in content]
        image_ids = []
        for side in (0, 1):
            refs = pc.binary_join_element_wise(source, kept.column(f"image_{side}_uid"), ":")
            image_ids.append(pc.coalesce(hashes[side], refs))  # metadata-only: the source's own id stands in
        prompts = pc.dictionary_encode(kept.column("prompt").combine_chunks())
        distinct_prompts = prompts.dictionary.to_pylist()
        for prompt in distinct_prompts:
            if prompt not in self.prompt_ids:
                self.prompt_ids[prompt] = ids.prompt_id(prompt)
        prompt_ids = pa.array([self.prompt_ids[p] for p in distinct_prompts], pa.string()).take(prompts.indices)
        return pa.table({
            "pair_id": pa.array(pair_ids, pa.string()), "source": _repeat(source, m),
            "split": pc.fill_null(kept.column("split"), "train"), "prompt": kept.column("prompt"),
            "prompt_id": prompt_ids,
            "image_0_id": image_ids[0], "image_1_id": image_ids[1],
            "image_0_uid": kept.column("image_0_uid"), "image_1_uid": kept.column("image_1_uid"),
            "label_0": kept.column("label_0"), "user_id": kept.column("user_id"),
            "created_at": kept.column("created_at"), "model_0": kept.column("model_0"),
            "model_1": kept.column("model_1"), "ranking_id": kept.column("ranking_id"),
            "ingest_id": _repeat(self.ingest_id, m),
        })

    def _hash_images(self, raw: pa.Table) -> tuple[list[pa.Array], "_BatchImages"]:
        """Content ids (string arrays, null where a row has no bytes) of image_0_bytes and image_1_bytes,
        and the batch's distinct images (_BatchImages: where their bytes lie, ids and memoryviews).

        Small images (mean under _DIRECT_HASH_MEAN_BYTES): both columns are dictionary-encoded together
        (Arrow hashes and compares the bytes in C), so an image is hashed once per batch however many rows,
        on either side, show it. Big ones: every value is hashed where it lies, and the distinct images
        are found from the ids; the dictionary's two copies of every byte (the concatenation, then the
        dictionary; tens of MB a batch, page faults included) would cost more than hashing the repeats."""
        sides = [_one_array(raw.column("image_0_bytes")), _one_array(raw.column("image_1_bytes"))]
        valid = sum(len(side) - side.null_count for side in sides)
        if valid and sum(side.nbytes for side in sides) > valid * _DIRECT_HASH_MEAN_BYTES:
            return self._hash_in_place(sides)
        # One array of both sides (a copy in C): dictionary_encode of a ChunkedArray is ~10x slower, and
        # encoding the sides apart hashes an image shown on both sides twice (measured: +25 % CPU at 64 px).
        encoded = pc.dictionary_encode(pa.concat_arrays(sides))
        dictionary, indices = encoded.dictionary, encoded.indices
        views = _binary_views(dictionary)
        hashes = self._digests(views, dictionary.nbytes)
        by_hash = pa.array(hashes, pa.string())
        n = raw.num_rows
        content = [by_hash.take(indices.slice(0, n)), by_hash.take(indices.slice(n))]
        distinct = len(hashes)
        images = _BatchImages([dictionary], np.zeros(distinct, np.int64), np.arange(distinct), hashes, views)
        return content, images

    def _hash_in_place(self, sides: list[pa.Array]) -> tuple[list[pa.Array], "_BatchImages"]:
        """_hash_images for big images: each value of both sides hashed in its column's buffer, no copy."""
        content, side_views = [], []
        for side in sides:
            views = _binary_views(side)
            valid = side.is_valid().to_pylist() if side.null_count else [True] * len(side)
            present = [v for v, ok in zip(views, valid) if ok]  # a null slot's view is empty: not an image
            digests = iter(self._digests(present, sum(map(len, present))))
            content.append(pa.array([next(digests) if ok else None for ok in valid], pa.string()))
            side_views.append(views)
        n = len(sides[0])
        encoded = pc.dictionary_encode(pa.concat_arrays(content))  # 32-char ids: cheap to encode
        codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False)
        distinct, first = np.unique(codes, return_index=True)  # first row (of 2n: side 0, then 1) per image
        first = first[distinct >= 0]
        hashes = encoded.dictionary.to_pylist()
        array_of, position = (first >= n).astype(np.int64), first % n if n else first
        views = [side_views[a][r] for a, r in zip(array_of.tolist(), position.tolist())]
        return content, _BatchImages(sides, array_of, position, hashes, views)

    def _digests(self, views: list[memoryview], nbytes: int) -> list[str]:
        """blake2b content ids (hex) of `views`; big images in `decode_threads` threads, a contiguous
        part each (hashlib releases the GIL on large buffers; one hand-off per part, not per image)."""
        def digests(part: list[memoryview]) -> list[str]:
            blake2b = hashlib.blake2b
            return [blake2b(data, digest_size=16).hexdigest() for data in part]

        threads = self.config.decode_threads
        if threads > 1 and views and nbytes > len(views) * _THREADED_HASH_MEAN_BYTES:
            step = -(-len(views) // threads)
            return [h for part in self.pool.map(digests, [views[i:i + step] for i in range(0, len(views), step)])
                    for h in part]
        return digests(views)

    def _quarantine(self, raw: pa.Table, content: list[pa.Array], result: IngestResult
                    ) -> tuple[np.ndarray, list[dict]]:
        """(ok: bool per row, the quarantine rows) of one batch: each row breaking a rule (rules.RULES)
        is quarantined with the reason of the first it breaks."""
        column = {name: _one_array(raw.column(name)) for name in
                  ("prompt", "label_0", "label_1", "image_0_uid", "image_1_uid", "reader_reason", "reader_detail")}
        checked = rules.RuleInput(column["prompt"], column["label_0"], column["label_1"], tuple(content),
                                  (column["image_0_uid"], column["image_1_uid"]), column["reader_reason"],
                                  column["reader_detail"], self.config.max_prompt_bytes, self.bad_images)
        first = rules.first_broken(checked)
        quarantine = []
        for i, k in zip(*[a.tolist() for a in (np.flatnonzero(first >= 0), first[first >= 0])]):
            reason, detail = rules.reason_and_detail(checked, i, k)
            result.n_quarantined += 1
            result.reasons[reason] += 1
            row = {name: value for name, value in raw.slice(i, 1).to_pylist()[0].items()
                   if name not in ("reader_reason", "reader_detail")}
            quarantine.append({"source": self.config.source, "source_file": self.source_file,
                               "row_identity": str(row["row_identity"]), "reason": reason, "detail": detail,
                               "raw": raw_summary(row), "ingest_id": self.ingest_id})
        return first < 0, quarantine

    def _new_images_and_refs(self, raw: pa.Table, rows: pa.Array, all_rows: bool, content: list[pa.Array],
                             images: "_BatchImages", decoded: dict) -> tuple[pa.Table, pa.Table]:
        """The images and image_refs rows that the valid `rows` (all of them if `all_rows`) bring and the
        lake lacks, in first-seen order (image_0 of every row, then image_1). The bytes are taken from
        the batch's dictionary of distinct images by Arrow (one copy in C, no Python bytes objects)."""
        sides = [content[side] if all_rows else content[side].take(rows) for side in (0, 1)]
        image_ids = pa.concat_arrays(sides)
        uids = []
        for side in (0, 1):
            column = raw.column(f"image_{side}_uid")
            column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
            uids.append(column if all_rows else column.take(rows))
        uids = pa.concat_arrays(uids)
        known_images = self.known_images
        new_ids = [i for i in pc.unique(image_ids.drop_null()).to_pylist() if i not in known_images]
        known_images.update(new_ids)
        index = images.index()
        meta = [decoded[i] for i in new_ids]
        images = pa.table({
            "image_id": pa.array(new_ids, pa.string()),
            "bytes": images.take([index[i] for i in new_ids]),
            "format": pa.array([m[0] for m in meta], pa.string()),
            "width": pa.array([m[1] for m in meta], pa.int32()), "height": pa.array([m[2] for m in meta], pa.int32()),
            "ingest_id": _repeat(self.ingest_id, len(new_ids))})
        with_ref = pc.and_(pc.is_valid(image_ids), pc.is_valid(uids))
        refs = pc.dictionary_encode(pc.binary_join_element_wise(self.config.source, uids.filter(with_ref), ":"))
        # The dictionary holds each ref once, in first-seen order; np.unique's return_index gives the row
        # of each one's first occurrence, whose image is the one recorded (as a row-by-row pass would).
        _, first = np.unique(refs.indices.to_numpy(zero_copy_only=False), return_index=True)
        known_refs = self.known_refs
        fresh = [k for k, ref in enumerate(refs.dictionary.to_pylist()) if ref not in known_refs]
        new_refs = refs.dictionary.take(pa.array(fresh, pa.int64()))
        known_refs.update(new_refs.to_pylist())
        image_refs = pa.table({"ref_id": new_refs,
                               "image_id": image_ids.filter(with_ref).take(_int64_array(first[fresh])),
                               "ingest_id": _repeat(self.ingest_id, len(fresh))})
        return images, image_refs


class _ReadAhead:
    """Iterates `batches`, each read in a thread while the caller works on the one before: the Parquet
    decode (pyarrow releases the GIL) overlaps the checks. Reading starts at construction; one batch is
    read ahead, so memory holds at most one beyond the one in use. The reader's exceptions are raised
    in the caller's thread, by __next__. close() waits for a read in flight and stops the thread."""

    def __init__(self, batches: Iterator[pa.Table]):
        self._batches = batches
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ingest-read")
        self._ahead = self._pool.submit(next, batches, None)

    def __iter__(self):
        return self

    def __next__(self) -> pa.Table:
        batch = self._ahead.result() if self._ahead is not None else None
        if batch is None:
            self._ahead = None
            raise StopIteration
        self._ahead = self._pool.submit(next, self._batches, None)
        return batch

    def close(self) -> None:
        self._ahead = None
        self._pool.shutdown(wait=True)


# Row groups of the ingest's part files: small enough that their encoding (Parquet + zstd, outside the
# GIL) runs in the writer thread while later batches are checked, rather than all in the commit.
_ROW_GROUP_BYTES = 8 << 20


def _write_outputs(tx, out: dict[str, pa.Table], config: IngestConfig) -> None:
    for table, partition in (("pairs", config.source), ("images", None), ("image_refs", None),
                             ("quarantine", config.source)):
        tx.write(table, out[table], partition=partition, max_file_bytes=config.max_file_bytes,
                 row_group_bytes=_ROW_GROUP_BYTES)


def ingest_file(lake: Lake, path: str, config: IngestConfig, reader) -> IngestResult:
    """Ingest one source file into `lake`, atomically and idempotently (see module docstring).
    Raises UnreadableSourceError, writing nothing, if the file as a whole cannot be read.

    Three threads share the work (the two cores of a small machine, where pyarrow and hashlib release
    the GIL): the file's sha256 (its identity) is computed while the reader opens the file and decodes
    the first batch; then each next batch is decoded while this one is checked (_ReadAhead), and each
    batch's output is encoded and written while the next one is checked."""
    check_partition_name("source", config.source)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise UnreadableSourceError(path, "file does not exist")
    stop_hashing = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="ingest-fingerprint") as hashing:
        hashed = hashing.submit(_file_sha256, fs, fs_path, stop_hashing)
        try:
            stream = reader.batches(fs_path, fs)
            first = next(stream, None)  # the reader raises UnreadableSourceError here, before any write
        except BaseException:
            stop_hashing.set()
            raise
        fingerprint = hashed.result()
    ingest_id = hashlib.blake2b(f"{fingerprint}|{config.source}|{config.format}".encode(), digest_size=12).hexdigest()
    with lake.writing():
        previous = _existing_ingest(lake, ingest_id)
        if previous is not None:
            stream.close()
            return IngestResult(ingest_id, path, True, previous["n_read"], previous["n_accepted"],
                                previous["n_duplicates"], previous["n_quarantined"], previous["n_images_new"])
        started = dt.datetime.now(dt.timezone.utc)
        rest = _ReadAhead(stream)  # the second batch is read while the known ids load
        batcher = bar = None
        writing = ThreadPoolExecutor(1, thread_name_prefix="ingest-write")
        try:
            result = IngestResult(ingest_id, path, False)
            batcher = _Batcher(lake, config, ingest_id, path)
            tx = lake.begin(ingest_id)
            bar = tqdm(desc=f"ingest {path.rsplit('/', 1)[-1]}", unit="rows", disable=None)  # terminal only
            try:
                written = None  # the previous batch's write, in the writer thread
                for batch in itertools.chain([first] if first is not None else [], rest):
                    out = batcher.process(batch, result)
                    if written is not None:
                        written.result()  # one batch in flight: memory stays bounded; its errors surface here
                    written = writing.submit(_write_outputs, tx, out, config)
                    bar.update(batch.num_rows)
                if written is not None:
                    written.result()
                bar.close()
                result.check()
                record = {"ingest_id": ingest_id, "source": config.source, "format": config.format,
                          "source_file": path, "fingerprint": fingerprint, "n_read": result.n_read,
                          "n_accepted": result.n_accepted, "n_duplicates": result.n_duplicates,
                          "n_quarantined": result.n_quarantined, "n_images_new": result.n_images_new,
                          "started_at": started, "finished_at": dt.datetime.now(dt.timezone.utc),
                          "prefcurate_version": VERSION}
                tx.commit({"ingests": [record]})
            except BaseException:
                writing.shutdown(wait=True)  # the writer must be idle before its transaction is undone
                tx.abort()
                raise
        finally:
            if bar is not None:
                bar.close()
            writing.shutdown(wait=True)
            rest.close()  # waits for a batch still being read
            if batcher is not None:
                batcher.pool.shutdown()
    return result


def quarantine_reasons(lake: Lake) -> dict[str, int]:
    table = lake.read("quarantine", columns=["reason"])
    if table.num_rows == 0:
        return {}
    counts = pc.value_counts(table.column("reason")).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: -c["counts"])}
