"""DICOM whole slides (scripts/workflows/slides/dicom.py): a folder of one file per level, found however it is given,
read by OpenSlide, or by wsidicom alone where OpenSlide is missing, with the same pixels."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from slide_fixtures import slide_pixels, write_aperio_slide, write_dicom_slide

from scripts.core.errors import DataError
from scripts.workflows.slides.dicom import DicomHandle, slide_files
from scripts.workflows.slides.reader import Slide, find_slides, open_slide, slide_name


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
    assert find_slides(export / "0001") == [export]  # one of its files, without an extension
    assert open_slide(export).handle.level_dimensions == ((1280, 1024), (640, 512))


def test_openslide_and_wsidicom_read_the_same_pixels(dicom_slide):
    folder, pixels = dicom_slide
    slide = open_slide(folder)
    assert slide.backend == "openslide" and slide.mpp == pytest.approx(0.25)
    assert slide.handle.level_dimensions == ((1280, 1024), (640, 512))
    alone = Slide(folder, DicomHandle(slide_files(folder)), "wsidicom", 0.25)
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
    with pytest.raises(DataError, match=r"notes: a folder with no DICOM whole-slide image"):
        open_slide(tmp_path / "notes")
    with pytest.raises(DataError, match=r"no slides in .*notes: .* and folders of DICOM files"):
        find_slides(tmp_path / "notes")


def _other_dicom(path) -> None:
    """A DICOM file that is no whole-slide image (a DICOMDIR or a secondary capture sits beside slides in exports)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)


def test_slides_and_other_dicom_files_beside_a_dicom_slide_are_told_apart(dicom_slide, tmp_path, monkeypatch):
    folder, _ = dicom_slide
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in folder.iterdir():
        (mixed / f.name).write_bytes(f.read_bytes())
    write_aperio_slide(mixed / "other.svs")
    _other_dicom(mixed / "DICOMDIR")
    assert find_slides(mixed) == [mixed, mixed / "other.svs"]  # the DICOM slide and the SVS beside it
    assert open_slide(mixed).handle.level_dimensions == ((1280, 1024), (640, 512))
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    _other_dicom(lonely / "capture.dcm")
    with pytest.raises(DataError, match=r"no slides in .*lonely"):
        find_slides(lonely)
    monkeypatch.chdir(folder)  # --input_dir . names the slide after the folder, not ""
    assert [slide_name(p) for p in find_slides(".")] == ["case"]
    assert find_slides("level_1.dcm") == [folder]


def test_a_folder_holding_two_dicom_slides_is_refused_with_the_fix(tmp_path):
    write_dicom_slide(tmp_path / "two", slide_pixels((512, 512), (0, 0, 256, 256)), levels=1)
    (tmp_path / "two" / "level_0.dcm").rename(tmp_path / "two" / "first.dcm")
    write_dicom_slide(tmp_path / "two", slide_pixels((512, 512), (256, 256, 512, 512), seed=1), levels=1)
    with pytest.raises(DataError, match=r"two: holds 2 DICOM slides .* put each slide's files in a folder of its own"):
        open_slide(tmp_path / "two")
