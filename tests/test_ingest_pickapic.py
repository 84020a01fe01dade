"""Ingest of Pick-a-Pic-shaped shards: acceptance, every kind of bad input, dedup, idempotence,
metadata-only pairs whose images arrive later, unreadable files, and crash safety."""
from __future__ import annotations

import datetime as dt
import io
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prefcurate.curation.store.ids import content_id, pair_id
from prefcurate.curation.ingest import IngestConfig, UnreadableSourceError, ingest_file, make_reader
from prefcurate.curation.ingest.engine import _jpeg_walk, _jpeg_walk_many
from prefcurate.curation.store.lake import InjectedFault, Lake, reset_faults
from prefcurate.data_schemas import PAIRS, validate


PICKAPIC_TYPES = {
    "are_different": pa.bool_(), "best_image_uid": pa.string(), "caption": pa.string(),
    "created_at": pa.timestamp("ns"), "has_label": pa.bool_(), "image_0_uid": pa.string(),
    "image_0_url": pa.string(), "image_1_uid": pa.string(), "image_1_url": pa.string(), "jpg_0": pa.binary(),
    "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64(), "model_0": pa.string(),
    "model_1": pa.string(), "ranking_id": pa.int64(), "user_id": pa.int64(), "num_example_per_prompt": pa.int64(),
    "__index_level_0__": pa.int64(),
}


def jpeg(color, size=24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


RED, BLUE, GREEN = jpeg((220, 30, 30)), jpeg((30, 30, 220)), jpeg((30, 200, 30))


def noise(fmt: str) -> bytes:
    """A 64 px noise image: real entropy-coded data (JPEG scan, PNG IDAT) for damage to land in."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def damaged_middle(data: bytes) -> bytes:
    """512 bytes of seeded garbage over the middle of the file; header and end marker are intact."""
    mid = len(data) // 2
    return data[:mid] + random.Random(0).randbytes(512) + data[mid + 512:]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# A 68-byte, structurally valid PNG whose header claims 12000 x 12000 RGB pixels (432 MB decoded).
BOMB_PNG = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 10)) + png_chunk(b"IEND", b""))


def row(i, *, caption="a red bicycle", jpg_0=RED, jpg_1=BLUE, label_0=1.0, label_1=None, user=7, uid0=None,
        uid1=None, has_label=True, are_different=True):
    label_1 = (1.0 - label_0 if label_0 == label_0 else label_0) if label_1 is None else label_1
    uid0 = uid0 or f"img-{content_id(jpg_0)[:8]}" if jpg_0 is not None else uid0
    uid1 = uid1 or f"img-{content_id(jpg_1)[:8]}" if jpg_1 is not None else uid1
    return {"are_different": are_different, "best_image_uid": uid0, "caption": caption,
            "created_at": dt.datetime(2023, 5, 1) + dt.timedelta(minutes=i), "has_label": has_label,
            "image_0_uid": uid0, "image_0_url": "https://dead/0", "image_1_uid": uid1, "image_1_url": "https://dead/1",
            "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label_0, "label_1": label_1, "model_0": "sd-1.5",
            "model_1": "sdxl", "ranking_id": 1000 + i, "user_id": user, "num_example_per_prompt": 1,
            "__index_level_0__": i}


def write_shard(path, rows, drop=()):
    types = {k: v for k, v in PICKAPIC_TYPES.items() if k not in drop}
    table = pa.table({k: pa.array([r[k] for r in rows], type=t) for k, t in types.items()})
    pq.write_table(table, path, row_group_size=4)
    return str(path)


def ingest(lake, path, source="pickapic"):
    return ingest_file(lake, str(path), IngestConfig(source=source, format="pickapic"),
                       make_reader("pickapic", batch_rows=3))


@pytest.fixture
def lake(tmp_path):
    return Lake(str(tmp_path / "lake"), create=True)


def test_good_rows_are_accepted_with_exact_values(tmp_path, lake):
    shard = write_shard(tmp_path / "train-00000-of-00001.parquet",
                        [row(0), row(1, label_0=0.0, jpg_1=GREEN), row(2, label_0=0.5, user=8)])
    result = ingest(lake, shard)
    assert (result.n_read, result.n_accepted, result.n_duplicates, result.n_quarantined) == (3, 3, 0, 0)
    pairs = lake.read("pairs")
    assert validate(pairs, PAIRS) == []
    rows = sorted(pairs.to_pylist(), key=lambda r: r["ranking_id"])
    assert [r["label_0"] for r in rows] == [1.0, 0.0, 0.5]  # ties kept as 0.5
    assert rows[0]["image_0_id"] == content_id(RED) and rows[1]["image_1_id"] == content_id(GREEN)
    assert rows[0]["pair_id"] == pair_id("pickapic", f"1000:{rows[0]['image_0_uid']}:{rows[0]['image_1_uid']}")
    assert rows[2]["user_id"] == "8" and rows[0]["split"] == "train"
    assert rows[0]["created_at"] == dt.datetime(2023, 5, 1, tzinfo=dt.timezone.utc)
    # RED is used by all three pairs but stored once.
    images = lake.read("images")
    assert sorted(images.column("image_id").to_pylist()) == sorted({content_id(RED), content_id(BLUE),
                                                                    content_id(GREEN)})
    assert set(images.column("format").to_pylist()) == {"JPEG"} and images.column("width").to_pylist()[0] == 24


@pytest.mark.parametrize("bad, reason", [
    (dict(jpg_0=RED[: len(RED) // 2]), "corrupt_image"),
    (dict(jpg_1=b"not an image at all"), "corrupt_image"),
    (dict(label_0=float("nan")), "nan_label"),
    (dict(label_0=1.0, label_1=1.0), "inconsistent_labels"),
    (dict(label_0=1.5, label_1=-0.5), "label_out_of_range"),
    (dict(caption="   "), "empty_prompt"),
    (dict(jpg_1=RED), "identical_images"),
    (dict(are_different=False, jpg_1=GREEN), "identical_images"),
    (dict(has_label=False), "unlabelled"),
    (dict(jpg_1=damaged_middle(noise("JPEG"))), "corrupt_image"),
    (dict(jpg_1=damaged_middle(noise("PNG"))), "corrupt_image"),
    (dict(jpg_0=BOMB_PNG), "image_too_large"),
    (dict(caption="x" * (1 << 20)), "prompt_too_long"),
])
def test_each_kind_of_bad_row_is_quarantined_and_the_ingest_goes_on(tmp_path, lake, bad, reason):
    shard = write_shard(tmp_path / "train-0.parquet", [row(0), row(1, **bad), row(2, jpg_1=GREEN)])
    result = ingest(lake, shard)
    assert (result.n_read, result.n_accepted, result.n_quarantined) == (3, 2, 1)
    [q] = lake.read("quarantine").to_pylist()
    assert q["reason"] == reason and q["row_identity"].startswith("1001:")
    assert q["source_file"] == shard and q["detail"]
    assert '"caption"' not in q["raw"] and '"prompt"' in q["raw"]  # the raw values a person needs, by our names


def test_damaged_images_are_ones_pillow_cannot_decode():
    """The damage the ingest check refuses is real: Pillow's full decode fails on both files."""
    for fmt in ("JPEG", "PNG"):
        with pytest.raises(OSError), Image.open(io.BytesIO(damaged_middle(noise(fmt)))) as im:
            im.load()


def jpeg_variants() -> list[bytes]:
    """Real JPEGs of several encodings and, for each, the kinds of damage a scraped file shows: cut at
    every byte, single bytes changed, stray markers, padding and junk between segments."""
    rng = np.random.default_rng(3)
    variants, rnd = [], random.Random(3)
    for i, options in enumerate([dict(quality=90), dict(progressive=True), dict(optimize=True, quality=40),
                                 dict(restart_marker_blocks=1), dict(subsampling=0, quality=100)]):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8 + 4 * i, 12, 3), dtype=np.uint8)).save(buffer, "JPEG", **options)
        good = buffer.getvalue()
        scan = good.index(b"\xff\xda") + 20  # inside the entropy-coded data of the first scan
        variants += [good, good + b"trailing bytes", good[:2] + b"\xff\xfe\x00\x05abc" + good[2:],
                     good[:2] + b"\xff\xff\xff" + good[2:], good[:2] + b"\x00\x00" + good[2:],
                     good[:2] + b"\xff\x01" + good[2:],  # TEM: a marker without a length
                     good[:2] + b"\xff\xfe\x00\x00" + good[2:], good[:2] + b"\xff\xfe\x00\x01" + good[2:],
                     good[:2] + b"\xff\xfe\xff\xff" + good[2:], good[:2] + b"\xff\xd9" + good[2:],
                     good[:scan] + b"\xff\x02" + good[scan:], good[:scan] + b"\xff\xd8" + good[scan:],
                     good[:scan] + b"\xff\xd8\x00\x02" + good[scan:],
                     good[:scan] + b"\xff\xd9", good[:scan] + b"\xff"]
        variants += [good[:cut] for cut in range(2, len(good))]
        for _ in range(150):
            at = rnd.randrange(2, len(good))
            variants.append(good[:at] + bytes([rnd.randrange(256)]) + good[at + 1:])
            variants.append(good[:at] + b"\xff" + bytes([rnd.randrange(256)]) + good[at + 2:])
    variants += [b"\xff\xd8", b"\xff\xd8\xff", b"\xff\xd8\xff\xd9", b"\xff\xd8\xff\x01\xff\xd9",
                 b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x10" + bytes(10) + b"\xff\xd9"]
    return variants


def test_the_vectorised_jpeg_walk_agrees_with_the_scalar_walk_on_every_file():
    """_jpeg_walk_many accepts exactly the files _jpeg_walk accepts, with the same size, and nothing else
    (the ingest runs the scalar walk, which names the damage, on whatever it does not accept)."""
    variants = jpeg_variants()
    # In the ingest the buffer also holds other images: a PNG after each JPEG, so no JPEG's last byte is
    # followed by the next JPEG's FF D8 (0xFF 0x89 is a marker, 0xFF 0xFF is not).
    array = pa.array([data for jpeg in variants for data in (jpeg, b"\x89PNG")], pa.binary())
    offsets = np.frombuffer(array.buffers()[1], np.int32).astype(np.int64)
    starts, ends = offsets[:-1:2], offsets[1::2]
    ok, width, height = _jpeg_walk_many(np.frombuffer(array.buffers()[2], np.uint8), starts, ends)
    expected = []
    for data in variants:
        try:
            expected.append(_jpeg_walk(data))
        except ValueError:
            expected.append(None)
    got = [(int(w), int(h)) if accepted else None for accepted, w, h in zip(ok, width, height)]
    assert got == expected
    assert 100 < sum(e is not None for e in expected) < len(variants) - 1000  # both outcomes well exercised
    # With a step limit too small for any file, nothing is accepted: the scalar walk gets them all.
    assert not _jpeg_walk_many(np.frombuffer(array.buffers()[2], np.uint8), starts, ends, max_steps=3)[0].any()


def test_a_batch_of_damaged_jpegs_is_quarantined_as_one_at_a_time(tmp_path):
    """The same rows ingested in one batch (vectorised checks) and one row per batch give the same lake."""
    variants = jpeg_variants()[::40]
    rows = [row(i, jpg_0=RED, jpg_1=data, uid1=f"v{i}") for i, data in enumerate(variants)]
    shard = write_shard(tmp_path / "train-0.parquet", rows)
    tables = []
    for name, batch_rows in (("one", len(rows)), ("each", 1)):
        lake = Lake(str(tmp_path / name), create=True)
        result = ingest_file(lake, shard, IngestConfig("pickapic", "pickapic"), make_reader("pickapic",
                                                                                            batch_rows=batch_rows))
        assert result.n_accepted > 10 and result.reasons["corrupt_image"] > 50
        tables.append({t: lake.read(t).drop_columns(["ingest_id"]).sort_by(key).to_pylist()
                       for t, key in (("pairs", "pair_id"), ("quarantine", "row_identity"), ("images", "image_id"))})
    assert tables[0] == tables[1]


def test_limits_are_configurable_and_quarantine_rows_stay_small(tmp_path, lake):
    shard = write_shard(tmp_path / "train-0.parquet", [row(0, caption="y" * 300_000), row(1, jpg_1=GREEN)])
    result = ingest_file(lake, shard, IngestConfig("pickapic", "pickapic", max_prompt_bytes=400_000,
                                                   max_image_pixels=24 * 24 - 1), make_reader("pickapic"))
    # The long prompt is now allowed; every 24x24 image is over the pixel limit.
    assert (result.n_accepted, result.n_quarantined, dict(result.reasons)) == (0, 2, {"image_too_large": 2})
    big = [q for q in lake.read("quarantine").to_pylist() if q["row_identity"].startswith("1000:")][0]
    assert "576 pixels, more than the limit of 575" in big["detail"]
    assert len(big["raw"]) < 1000 and '"chars": 300000' in big["raw"]  # the 300 kB prompt, summarised
    with pytest.raises(ValueError, match="max_prompt_bytes must be >= 1"):
        IngestConfig("pickapic", "pickapic", max_prompt_bytes=0)


def test_the_same_bad_input_gives_byte_identical_quarantine_rows(tmp_path):
    """No object address (PIL's '<_io.BytesIO object at 0x...>') or time in quarantine content."""
    rows = [row(0), row(1, jpg_1=b"not an image at all"), row(2, jpg_0=damaged_middle(noise("PNG"))),
            row(3, jpg_1=BOMB_PNG), row(4, caption="z" * 10_000)]
    shard = write_shard(tmp_path / "train-0.parquet", rows)
    tables = []
    for name in ("a", "b"):
        lake = Lake(str(tmp_path / name), create=True)
        ingest(lake, shard)
        tables.append(lake.read("quarantine").sort_by("row_identity"))
    assert tables[0].num_rows == 4 and tables[0].equals(tables[1])
    details = tables[0].column("detail").to_pylist()
    assert not any(" at 0x" in d for d in details), details
    assert "cannot identify image file" in details[0]


def test_wrong_type_values_are_quarantined(tmp_path, lake):
    rows = [row(0), row(1)]
    table = pa.table({k: pa.array([r[k] for r in rows], type=t) for k, t in PICKAPIC_TYPES.items()})
    table = table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(["1.0", "left"]))
    pq.write_table(table, tmp_path / "train-0.parquet")
    result = ingest(lake, tmp_path / "train-0.parquet")
    assert (result.n_accepted, result.n_quarantined) == (1, 1)
    [q] = lake.read("quarantine").to_pylist()
    assert q["reason"] == "wrong_type" and "label_0" in q["detail"]


def test_duplicates_within_a_file_and_across_files(tmp_path, lake):
    first = write_shard(tmp_path / "train-0.parquet", [row(0), row(0), row(1, jpg_1=GREEN)])
    r1 = ingest(lake, first)
    assert (r1.n_read, r1.n_accepted, r1.n_duplicates) == (3, 2, 1)
    second = write_shard(tmp_path / "train-1.parquet", [row(1, jpg_1=GREEN), row(2, label_0=0.0)])
    r2 = ingest(lake, second)  # a new shard appends; its repeated row is a duplicate
    assert (r2.n_read, r2.n_accepted, r2.n_duplicates) == (2, 1, 1)
    assert lake.read("pairs").num_rows == 3
    # The same row under another source label is a different pair.
    r3 = ingest(lake, first, source="pickapic_mirror")
    assert r3.n_accepted == 2 and lake.read("pairs").num_rows == 5


def test_reingest_is_a_noop(tmp_path, lake):
    shard = write_shard(tmp_path / "train-0.parquet", [row(0), row(1, caption="")])
    first = ingest(lake, shard)
    files_before = {t: lake.files(t) for t in ("pairs", "images", "quarantine", "ingests")}
    again = ingest(lake, shard)
    assert again.already_ingested and (again.n_read, again.n_accepted, again.n_quarantined) == (2, 1, 1)
    assert {t: lake.files(t) for t in files_before} == files_before
    assert first.ingest_id == again.ingest_id and lake.read("ingests").num_rows == 1


def test_metadata_only_pairs_get_their_images_when_a_shard_with_bytes_arrives(tmp_path, lake):
    rows = [row(0, uid0="u-red", uid1="u-blue"), row(1, uid0="u-red", uid1="u-green", jpg_1=GREEN)]
    meta = write_shard(tmp_path / "train-meta.parquet", [dict(r, jpg_0=None, jpg_1=None) for r in rows],
                       drop=("jpg_0", "jpg_1"))
    r1 = ingest(lake, meta)
    assert (r1.n_accepted, r1.n_images_new) == (2, 0)
    pairs = lake.read("pairs").to_pylist()
    assert {p["image_0_id"] for p in pairs} == {"pickapic:u-red"}
    full = write_shard(tmp_path / "train-full.parquet", rows)
    r2 = ingest(lake, full)
    assert (r2.n_read, r2.n_duplicates, r2.n_images_new) == (2, 2, 3)  # same pairs, new images
    refs = {r["ref_id"]: r["image_id"] for r in lake.read("image_refs").to_pylist()}
    assert refs["pickapic:u-red"] == content_id(RED) and refs["pickapic:u-green"] == content_id(GREEN)


@pytest.mark.parametrize("content, what", [
    (b"PAR1 this is not parquet", "not a Parquet file"),
    (None, "required column(s) missing"),
])
def test_unreadable_file_fails_with_one_line_and_writes_nothing(tmp_path, lake, content, what):
    path = tmp_path / "train-bad.parquet"
    if content is None:
        pq.write_table(pa.table({"prompt": ["x"], "winner": [1]}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(UnreadableSourceError) as error:
        ingest(lake, path)
    assert what in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)
    for table in ("pairs", "images", "quarantine", "ingests"):
        assert lake.files(table) == []
    assert not os.path.exists(os.path.join(lake.path, "_staging")) or not os.listdir(
        os.path.join(lake.path, "_staging"))


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
    from prefcurate.curation.store.lake import Lake
    lake = Lake(sys.argv[1], create=True)
    if sys.argv[3] == "during-moves":
        # Die like a SIGKILL right after the first staged file is moved into place.
        real_mv = lake.fs.mv
        def mv(src, dst, *a, **k):
            real_mv(src, dst, *a, **k)
            if "_staging" in src and dst.endswith(".parquet"):
                os._exit(9)
        lake.fs.mv = mv
    ingest_file(lake, sys.argv[2], IngestConfig("pickapic", "pickapic"), make_reader("pickapic", batch_rows=50))
""")


def _many_rows(n):
    colors = [jpeg((i * 7 % 256, i * 13 % 256, i * 29 % 256), size=48) for i in range(64)]
    return [row(i, jpg_0=colors[i % 64], jpg_1=colors[(i + 1) % 64], user=i % 9) for i in range(n)]


def _assert_clean_complete_lake(lake, n_rows):
    pairs = lake.read("pairs")
    assert pairs.num_rows == n_rows
    assert len(set(pairs.column("pair_id").to_pylist())) == n_rows
    assert lake.read("ingests").num_rows == 1
    for table in ("pairs", "images", "ingests"):
        for f in lake.files(table):
            pq.read_metadata(f)  # every visible file is a complete Parquet file
    leftovers = [f for _, _, fs in os.walk(lake.path) for f in fs if ".tmp-" in f]
    assert leftovers == []


def test_crash_while_moving_files_is_rolled_forward(tmp_path):
    shard = write_shard(tmp_path / "train-0.parquet", _many_rows(400))
    root = str(tmp_path / "lake")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    crashed = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, root, shard, "during-moves"], env=env)
    assert crashed.returncode == 9
    lake = Lake(root)
    assert lake.read("ingests").num_rows == 0  # not yet committed in the visible tables
    result = ingest(lake, shard)  # recovery rolls the committed transaction forward first
    assert result.already_ingested
    _assert_clean_complete_lake(lake, 400)


def test_killed_mid_write_leaves_nothing_visible_and_a_rerun_completes(tmp_path):
    shard = write_shard(tmp_path / "train-0.parquet", _many_rows(6000))
    root = str(tmp_path / "lake")
    # SIGKILL right after the first staged Parquet file is flushed (the lake's fault hook): polling for staged
    # files from outside raced the ingest, whose files now exist for ~0.1 s at the end of a 2 s run.
    env = dict(os.environ, PYTHONPATH=os.getcwd(), PREFCURATE_FAULT="after_flush", PREFCURATE_FAULT_ACTION="kill")
    process = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, root, shard, "kill"], env=env)
    staging = os.path.join(root, "_staging")
    process.wait()
    assert process.returncode == -signal.SIGKILL
    lake = Lake(root)
    assert lake.files("pairs") == [] and lake.files("ingests") == []  # nothing half-written is visible
    result = ingest(lake, shard)
    assert not result.already_ingested and result.n_accepted == 6000
    assert not os.listdir(staging)
    _assert_clean_complete_lake(lake, 6000)


class _FailsAfterFirstBatch:
    """A reader whose file turns unreadable after the first batch (a network drive that goes away)."""

    format = "pickapic"

    def batches(self, path, fs):
        yield next(make_reader("pickapic", batch_rows=2).batches(path, fs))
        raise OSError("the source went away")


@pytest.mark.parametrize("fault", ["reader", "writer", "interrupt"])
def test_an_error_in_the_read_or_write_thread_undoes_the_ingest(tmp_path, monkeypatch, fault):
    """Reading ahead and writing run in threads: their errors (and Ctrl-C) still reach the caller, the
    transaction is undone, no thread is left behind, and a rerun ingests everything."""
    import threading

    shard = write_shard(tmp_path / "train-0.parquet", [row(i, jpg_1=[BLUE, GREEN][i % 2]) for i in range(6)])
    lake = Lake(str(tmp_path / "lake"), create=True)
    def ours():  # tqdm's monitor is a shared daemon of tqdm's own, which it ends when no bar is open
        return sorted(t.name for t in threading.enumerate() if t.name != "tqdm_monitor")

    threads_before = ours()
    reader = make_reader("pickapic", batch_rows=2)
    if fault == "reader":
        reader, error = _FailsAfterFirstBatch(), OSError
    else:  # the lake's fault hook, passed in the writer thread (the first row-group flush)
        monkeypatch.setenv("PREFCURATE_FAULT", "before_flush")
        monkeypatch.setenv("PREFCURATE_FAULT_ACTION", "raise" if fault == "writer" else "interrupt")
        reset_faults()
        error = InjectedFault if fault == "writer" else KeyboardInterrupt
        monkeypatch.setattr("prefcurate.curation.ingest.engine._ROW_GROUP_BYTES", 1)  # flush with every batch
    with pytest.raises(error):
        ingest_file(lake, shard, IngestConfig("pickapic", "pickapic"), reader)
    assert ours() == threads_before
    assert lake.files("pairs") == [] and lake.files("ingests") == []
    assert not os.listdir(os.path.join(lake.root, "_staging"))
    monkeypatch.delenv("PREFCURATE_FAULT", raising=False)
    reset_faults()
    result = ingest(lake, shard)
    assert (result.n_read, result.n_accepted, result.n_quarantined) == (6, 6, 0)
    assert lake.read("pairs").num_rows == 6


def test_an_fsspec_url_lake_goes_through_the_same_code(tmp_path):
    """The lake on fsspec's in-memory filesystem stands in for s3:// and the like."""
    import fsspec

    shard = write_shard(tmp_path / "train-0.parquet", [row(0), row(1, jpg_1=GREEN), row(2, caption="")])
    root = f"memory://prefcurate-test-{os.getpid()}/lake"
    lake = Lake(root, create=True)
    try:
        result = ingest(lake, shard)
        assert (result.n_accepted, result.n_quarantined) == (2, 1)
        assert ingest(lake, shard).already_ingested
        assert lake.read("pairs").num_rows == 2 and lake.read("quarantine").column("reason").to_pylist() == [
            "empty_prompt"]
        assert all(f.startswith(f"/prefcurate-test-{os.getpid()}/lake/") for f in lake.files("pairs"))
        assert not fsspec.filesystem("memory").exists(f"/prefcurate-test-{os.getpid()}/lake/_staging/"
                                                      f"{result.ingest_id}")
    finally:
        fsspec.filesystem("memory").rm(f"/prefcurate-test-{os.getpid()}", recursive=True)


def test_hashing_images_in_place_gives_the_same_lake_as_the_dictionary(tmp_path, monkeypatch):
    """Big images are hashed where they lie (every occurrence), small ones after dictionary-encoding the
    image columns: both ways give the same tables, row for row, repeats and bad images included."""
    big, png = noise("JPEG"), noise("PNG")
    rows = [row(0), row(1, jpg_0=big, jpg_1=RED), row(2, jpg_0=BLUE, jpg_1=big), row(3, jpg_0=big, jpg_1=big),
            row(4, jpg_0=damaged_middle(big), jpg_1=GREEN), row(5, jpg_0=png, jpg_1=None, uid1="img-x"),
            row(6, label_0=float("nan"), jpg_0=GREEN), row(7, jpg_0=None, jpg_1=None, uid0="u0", uid1="u1"),
            row(8, jpg_0=RED[:40]), row(9, jpg_0=png, jpg_1=big), row(10, jpg_0=GREEN, jpg_1=big)]
    shard = write_shard(tmp_path / "train-00000-of-00001.parquet", rows)
    tables = []
    for threshold in (0, 1 << 40):  # every batch in place / every batch through the dictionary
        monkeypatch.setattr("prefcurate.curation.ingest.engine._DIRECT_HASH_MEAN_BYTES", threshold)
        lake = Lake(str(tmp_path / f"lake-{threshold}"), create=True)
        result = ingest_file(lake, shard, IngestConfig(source="pickapic", format="pickapic"),
                             make_reader("pickapic", batch_rows=4))
        counts = (result.n_read, result.n_accepted, result.n_duplicates, result.n_quarantined, result.n_images_new)
        tables.append((counts, dict(result.reasons),
                       {t: lake.read(t).to_pylist() for t in ("pairs", "images", "image_refs", "quarantine")}))
    assert tables[0] == tables[1]
    assert tables[0][0][3] >= 3 and tables[0][0][4] >= 5
