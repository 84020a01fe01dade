"""Reader for WMT manual-evaluation rankings (the WMT13 CSV of keisks/wmt-trueskill; docs/data-and-scorers.md §11.2).

Header: ``srclang, trglang, srcIndex, documentId, segmentId, judgeId, system{1..5}Number,
system{1..5}Id, system{1..5}rank``. Each row is one judge ranking up to five machine translations
of one source segment: rank 1 = best, equal ranks = a tie. The CSV has no texts, only ids, so
every pair is metadata-only, shaped "prompt x model x judge" like text-to-image model comparisons:

* prompt = ``'<srclang>-<trglang> segment <srcIndex>'`` (e.g. ``French-English segment 556``), so
  each source segment is one prompt;
* image_*_uid = ``'<srcIndex>/<system id>'``: one translation is one system's output for one
  segment (the lake's image id is ``'<source>:<srcIndex>/<system id>'``); model_* = the system id;
* label_0 from the two ranks: 1 if image_0's rank is lower (better), 0 if higher, 0.5 if equal;
* user_id = judgeId; ranking_id = ``'<file name>:<row>'``.

All k(k-1)/2 pairs of the ranked systems of a row are emitted, in column order. A slot with an
empty system id, or rank empty or -1, is a system that was not ranked. Row identity:
``<row>:<judge>:<srcIndex>:<system a>:<system b>`` with data rows counted from 1. The row number
is part of it because a judge ranking the same set again is a new judgement, not a duplicate
(WMT computes intra-annotator agreement from such repeats; in the train file 248 (segment,
judge, systems) sets are ranked more than once). Problem rows give one quarantined row each:
``wrong_type`` (a rank that is not an integer), ``fewer_than_two_ranked`` (nothing to compare),
``malformed_csv_row`` (cell count differs from the header). The file is refused if srcIndex,
judgeId, system1Id/rank or system2Id/rank are missing from the header. It is read row by row
with the csv module, in batches of ``batch_rows`` pairs.
"""
from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator

import pyarrow as pa

from prefcurate.curation.ingest.raw import UnreadableSourceError
from prefcurate.curation.ingest.rows import RowBuffer, rank_pairs, split_from_filename


REQUIRED = ("srcIndex", "judgeId", "system1Id", "system1rank", "system2Id", "system2rank")
_SLOT = re.compile(r"^system(\d+)Id$")
NOT_RANKED = ("", "-1")


class WMTRankingsReader:
    format = "wmt"

    def __init__(self, split: str | None = None, batch_rows: int = 1024):
        # Metadata-only rows are ~200 bytes: 1024 of them is a fraction of a MB.
        self.split = split
        self.batch_rows = batch_rows

    def batches(self, path: str, fs) -> Iterator[pa.Table]:
        split = self.split or split_from_filename(path) or "train"
        name = os.path.basename(path)
        with fs.open(path, "rb") as f:
            rows = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
            number = 0
            try:
                header = next(rows, None)
                if header is None:
                    raise UnreadableSourceError(path, "empty file: no CSV header")
                column = {title.strip(): i for i, title in enumerate(header)}
                missing = [c for c in REQUIRED if c not in column]
                if missing:
                    raise UnreadableSourceError(path, f"not a WMT rankings CSV: column(s) {missing} missing "
                                                      f"from the header")
                slots = sorted(int(m.group(1)) for c in column
                               if (m := _SLOT.match(c)) and f"system{m.group(1)}rank" in column)
                buffer = RowBuffer(self.batch_rows)
                for number, cells in enumerate(rows, start=1):
                    for row in self._pairs(cells, number, header, column, slots, name):
                        batch = buffer.add(split=split, **row)
                        if batch is not None:
                            yield batch
            except (UnicodeDecodeError, csv.Error) as exc:
                # Mid-file: the engine aborts the ingest, so nothing of this file is written.
                raise UnreadableSourceError(path, f"unreadable CSV after data row {number}: {exc}") from None
            batch = buffer.flush()
            if batch is not None:
                yield batch

    @staticmethod
    def _pairs(cells: list[str], number: int, header: list[str], column: dict[str, int], slots: list[int],
               name: str) -> list[dict]:
        """The RAW rows of one ranking: its pairs, or one problem row."""
        if len(cells) != len(header):
            return [{"row_identity": str(number), "reader_reason": "malformed_csv_row",
                     "reader_detail": f"row {number} has {len(cells)} cells, the header {len(header)}"}]
        value = {c: cells[i].strip() for c, i in column.items()}
        segment, judge = value["srcIndex"], value["judgeId"] or None
        ranked: list[tuple[str, int]] = []
        for slot in slots:
            system, rank = value[f"system{slot}Id"], value[f"system{slot}rank"]
            if system == "" or rank in NOT_RANKED:
                continue
            if not rank.isdigit() or int(rank) < 1:
                return [{"row_identity": str(number), "user_id": judge, "reader_reason": "wrong_type",
                         "reader_detail": f"row {number}: system{slot}rank {rank!r} is not an integer >= 1"}]
            ranked.append((system, int(rank)))
        if len(ranked) < 2:
            return [{"row_identity": str(number), "user_id": judge, "reader_reason": "fewer_than_two_ranked",
                     "reader_detail": f"row {number}: {len(ranked)} ranked system(s), a pair needs 2"}]
        languages = "-".join(value[c] for c in ("srclang", "trglang") if value.get(c))
        prompt = f"{languages} segment {segment}".strip() if segment else None
        rows = []
        for i, j, label in rank_pairs([float(rank) for _, rank in ranked]):
            (system_0, _), (system_1, _) = ranked[i], ranked[j]
            rows.append({"row_identity": f"{number}:{judge}:{segment}:{system_0}:{system_1}", "prompt": prompt,
                         "image_0_uid": f"{segment}/{system_0}", "image_1_uid": f"{segment}/{system_1}",
                         "label_0": label, "user_id": judge, "model_0": system_0, "model_1": system_1,
                         "ranking_id": f"{name}:{number}"})
        return rows
