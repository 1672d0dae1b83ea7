"""One slide's outputs, written as its tiles finish, and the progress file that lets a killed run go on.

The GeoJSON and CSV grow in hidden `.partial` files, tile by tile.  After each tile, a line of `.progress.jsonl`
records the tile and the byte length both files had then; the data is flushed before the line is written, so the
line never claims more than the files hold.  A resumed run cuts the partial files back to the last recorded lengths
(dropping whatever a kill left half-written), skips the recorded tiles and appends.  When the last tile is done
the GeoJSON is closed, both files are renamed to their final names, and the summary JSON — whose presence marks the
slide finished — is written last.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO

from scripts.core.atomic import fsync_folder, umask, write_json
from scripts.workflows.predict.nucleus_record import CSV_HEADER, GEOJSON_HEAD, GEOJSON_TAIL

logger = logging.getLogger(__name__)

FSYNC_EVERY = 64  # tiles between fsyncs (a flush per tile already survives a killed process)


class SlideProgress:
    """Args:
    folder: the slide's output folder.
    name: the slide's name (its file name without the extension).
    part: "" for a whole slide; ".rank<r>of<n>" for the share of its tiles one torchrun rank writes.
    """

    def __init__(self, folder: str | os.PathLike, name: str, part: str = "") -> None:
        self.folder, self.name, self.part = Path(folder), name, part
        self.geojson = self.folder / f"{name}_nuclei.geojson"
        self.csv = self.folder / f"{name}_nuclei.csv"
        self.summary = self.folder / f"{name}_summary.json"
        self.progress = self.folder / f".progress{part}.jsonl"
        self.partial = {kind: self.folder / f".{name}_nuclei.{kind}{part}.partial" for kind in ("geojson", "csv")}
        self.done: set[int] = set()
        self.nuclei = 0
        self.per_type: list[int] = []  # nuclei of type id t at [t - 1], grown as types appear
        self._files: dict[str, IO[str]] = {}
        self._log: IO[str] | None = None
        self._since_sync = 0

    @property
    def grid_file(self) -> Path:
        return self.folder / f".grid{self.part}.json"

    def same_grid(self, grid: dict) -> bool:
        """Whether recorded progress was made on this tile grid (tile size, margin, scales, tiles); without a
        record there is nothing to compare, and no progress either."""
        try:
            return json.loads(self.grid_file.read_text()) == json.loads(json.dumps(grid))
        except (OSError, ValueError):
            return not self.progress.exists()

    def write_grid(self, grid: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.grid_file, grid)

    def files(self) -> list[Path]:
        """Every file of this slide (or rank's part) that is read, appended to, cut or renamed in place."""
        return [self.geojson, self.csv, self.summary, self.progress, *self.partial.values(), self.grid_file]

    def finished(self) -> bool:
        return self.summary.is_file()

    def reset(self) -> None:
        for path in (self.progress, *self.partial.values()):
            path.unlink(missing_ok=True)
        if not self.part:
            self.summary.unlink(missing_ok=True)

    def tile_ranges(self) -> dict[int, tuple[int, int, int, int]]:
        """{tile: (GeoJSON start, end, CSV start, end)}: where each recorded tile's nuclei lie in the partial files."""
        if not self.progress.is_file():  # this part had no tile of the slide
            return {}
        lines = [json.loads(text) for text in self.progress.read_text().splitlines() if text.strip()]
        g0, c0 = len(GEOJSON_HEAD.encode()), len(CSV_HEADER.encode())
        ranges = {}
        for line in lines:
            ranges[line["tile"]] = (g0, line["geojson"], c0, line["csv"])
            g0, c0 = line["geojson"], line["csv"]
        return ranges

    def remove(self) -> None:
        """Delete this part's partial and progress files (after they were merged)."""
        self.close()
        for path in (self.progress, *self.partial.values(), self.grid_file):
            path.unlink(missing_ok=True)

    def resume(self) -> set[int]:
        """Tiles finished by an earlier run; cuts the partial files back to what those tiles wrote."""
        lines = []
        journal = self.progress.read_bytes().splitlines() if self.progress.is_file() else []
        for number, raw in enumerate(journal, start=1):
            line = _journal_line(raw, list(self.partial))
            if line is None:  # a line cut by a kill (the last), or damaged: everything from it on is redone
                if number < len(journal):
                    logger.warning(f"{self.progress}: line {number} is damaged; the tiles from there are redone")
                break
            lines.append(line)
        if not lines or not all(p.is_file() for p in self.partial.values()):
            self.reset()
            return set()
        last = lines[-1]
        for kind, path in self.partial.items():
            if path.stat().st_size < last[kind]:  # the files lost data the log claims: start the slide again
                self.reset()
                return set()
            os.truncate(path, last[kind])
        self.progress.write_text("".join(json.dumps(line) + "\n" for line in lines))
        self.done = {line["tile"] for line in lines}
        self.nuclei, self.per_type = last["nuclei"], list(last["per_type"])
        return set(self.done)

    def _open(self) -> None:
        if self._files:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        new = not self.partial["geojson"].is_file()
        self._files = {kind: open(path, "a", encoding="utf-8", newline="") for kind, path in self.partial.items()}
        if new:
            self._files["geojson"].write(GEOJSON_HEAD)
            self._files["csv"].write(CSV_HEADER)
        self._log = open(self.progress, "a", encoding="utf-8")

    def add_tile(self, tile: int, features: list[str], rows: list[str], types: list[int]) -> None:
        """Append one tile's nuclei (GeoJSON feature texts, CSV lines, type ids) and record the tile as done."""
        self._open()
        if features:
            lead = "" if self.nuclei == 0 else ",\n"
            self._files["geojson"].write(lead + ",\n".join(features))
        self._files["csv"].writelines(rows)
        for f in self._files.values():
            f.flush()
        self.nuclei += len(features)
        for t in types:
            if t > len(self.per_type):
                self.per_type.extend([0] * (t - len(self.per_type)))
            self.per_type[t - 1] += 1
        lengths = {kind: f.tell() for kind, f in self._files.items()}
        self._log.write(json.dumps({"tile": tile, **lengths, "nuclei": self.nuclei, "per_type": self.per_type}) + "\n")
        self._log.flush()
        self.done.add(tile)
        self._since_sync += 1
        if self._since_sync >= FSYNC_EVERY:
            self._sync()

    def _sync(self) -> None:
        for f in (*self._files.values(), self._log):
            if f is not None:
                os.fsync(f.fileno())
        self._since_sync = 0

    def finish(self, summary: dict) -> None:
        """Close and publish the GeoJSON and CSV, then write the summary that marks the slide finished."""
        self._open()
        self._files["geojson"].write(GEOJSON_TAIL)
        self._sync()
        for f in (*self._files.values(), self._log):
            f.close()
        self._files, self._log = {}, None
        for kind, final in (("geojson", self.geojson), ("csv", self.csv)):
            os.chmod(self.partial[kind], 0o666 & ~umask())
            os.replace(self.partial[kind], final)
        fsync_folder(self.folder)
        write_json(self.summary, summary)
        self.progress.unlink(missing_ok=True)
        self.grid_file.unlink(missing_ok=True)

    def close(self) -> None:
        for f in (*self._files.values(), self._log):
            if f is not None:
                f.close()
        self._files, self._log = {}, None


def _journal_line(raw: bytes, files: list[str]) -> dict | None:
    """One line of the progress journal as this module writes it, or None for anything else."""
    try:
        line = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    counts = ["tile", "nuclei", *files]
    if not isinstance(line, dict) or not all(isinstance(line.get(k), int) and line[k] >= 0 for k in counts):
        return None
    if not isinstance(line.get("per_type"), list) or not all(isinstance(n, int) for n in line["per_type"]):
        return None
    return line
