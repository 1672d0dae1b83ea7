"""DICOM whole slides (scripts/slides/dicom.py): a folder of one file per level, found however it is given, read by
OpenSlide, or by wsidicom alone where OpenSlide is missing, with the same pixels."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from slide_fixtures import slide_pixels, write_dicom_slide

from scripts.errors import DataError
from scripts.slides.dicom import DicomHandle
from scripts.slides.reader import Slide, find_slides, open_slide, slide_name


@pytest.fixture(scope="module")
def dicom_slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "slides" / "case"
    pixels = slide_pixels((1280, 1024), (256, 256, 1024, 768))
    write_dicom_slide(folder, pixels, mpp=0.25, levels=2)
    return folder, pixels


def test_a_folder_of_dicom_files_is_one_slide_however_it_is_given(dicom_slide, tmp_path):
    folder, _ = dicom_slide
    assert find_slides(folder) == [folder] and find_slides(folder / "level_0.dcm") == [folder]
    assert find_slides(folder.parent) == [folder] and slide_name(folder) == "case"
    export = tmp_path / "export.2026"  # a PACS export: files named by number, no extension, a note beside them
    export.mkdir()
    for number, f in enumerate(sorted(folder.iterdir())):
        (export / f"{number:04d}").write_bytes(f.read_bytes())
    (export / "README.txt").write_text("exported from the archive")
    assert find_slides(export) == [export] and slide_name(export) == "export.2026"
    assert open_slide(export).handle.level_dimensions == ((1280, 1024), (640, 512))


def test_openslide_and_wsidicom_read_the_same_pixels(dicom_slide):
    folder, pixels = dicom_slide
    slide = open_slide(folder)
    assert slide.backend == "openslide" and slide.mpp == pytest.approx(0.25)
    assert slide.handle.level_dimensions == ((1280, 1024), (640, 512))
    alone = Slide(folder, DicomHandle(folder), "wsidicom", 0.25)
    for x, y, w, h in [(300, 300, 256, 256), (1100, 900, 400, 300)]:  # the second leaves the slide
        by_openslide, by_wsidicom = slide.read(x, y, w, h).astype(int), alone.read(x, y, w, h).astype(int)
        assert np.abs(by_openslide - by_wsidicom).mean() < 1
        inside = pixels[y : y + h, x : x + w]
        assert np.abs(by_wsidicom[: inside.shape[0], : inside.shape[1]] - inside).mean() < 4  # JPEG
    assert (by_wsidicom[-40:, -100:] == 255).all()  # outside the slide is white, as OpenSlide gives it
    assert np.abs(slide.thumbnail(320)[0].astype(int) - alone.thumbnail(320)[0]).mean() < 1


def test_wsidicom_reads_the_slide_where_openslide_is_missing(dicom_slide, monkeypatch):
    folder, _ = dicom_slide
    monkeypatch.setitem(sys.modules, "openslide", None)  # `import openslide` now fails, as without openslide-bin
    slide = open_slide(folder)
    assert slide.backend == "wsidicom" and slide.mpp == pytest.approx(0.25) and slide.level_for_model() == 0
    thumb, factor = slide.thumbnail(320)
    assert thumb.shape == (256, 320, 3) and factor == pytest.approx(4)
    slide.close()
    assert slide.handle.level_downsamples == (1.0, 2.0)  # reopened with the same reader


def test_a_folder_without_dicom_files_is_neither_a_slide_nor_a_slide_folder(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not a slide")
    with pytest.raises(DataError, match=r"notes: a folder with no DICOM file"):
        open_slide(tmp_path / "notes")
    with pytest.raises(DataError, match=r"no slides in .*notes: .* and folders of DICOM files"):
        find_slides(tmp_path / "notes")
