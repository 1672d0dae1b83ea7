"""Small pyramidal slides made here: demo H&E tiles on glass, JPEG tiles, OME-TIFF with its µm per pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from scripts.data.pannuke.demo_data import make_tile

GLASS = 242


def slide_pixels(size: tuple[int, int], tissue: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """Glass with demo H&E tiles on `tissue` ((x0, y0, x1, y1) in pixels): (height, width, 3) uint8."""
    rng = np.random.default_rng(seed)
    image = np.full((size[1], size[0], 3), GLASS, np.uint8)
    x0, y0, x1, y1 = tissue
    for y in range(y0, y1, 256):
        for x in range(x0, x1, 256):
            tile, _ = make_tile(rng)
            h, w = min(256, y1 - y), min(256, x1 - x)
            image[y : y + h, x : x + w] = np.rint(tile[:h, :w]).astype(np.uint8)
    return image


def write_slide(
    path: Path,
    size: tuple[int, int] = (1536, 1536),
    tissue: tuple[int, int, int, int] = (256, 256, 1280, 1024),
    mpp: float | None = 0.25,
    levels: int = 3,
    seed: int = 0,
) -> np.ndarray:
    """Write the slide and return its level-0 pixels.  `tissue` is (x0, y0, x1, y1) in level-0 pixels."""
    image = slide_pixels(size, tissue, seed)
    pyramid = [image[:: 2**i, :: 2**i] for i in range(levels)]
    path.parent.mkdir(parents=True, exist_ok=True)
    options = dict(tile=(256, 256), compression="jpeg", photometric="rgb")
    physical = {}
    if mpp is not None:
        physical = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True, ome=mpp is not None) as tif:
        metadata = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if mpp is not None else None
        tif.write(pyramid[0], subifds=levels - 1, metadata=metadata, **physical, **options)
        for level in pyramid[1:]:
            tif.write(level, subfiletype=1, **options)
    return image


def write_aperio_slide(path: Path, size: int = 1280, tissue: int = 256, mpp: float = 0.25, seed: int = 0) -> np.ndarray:
    """An SVS laid out as Aperio's scanners write it (tiled JPEG pages, the 'Aperio Image Library' description with
    AppMag and MPP), which OpenSlide's Aperio reader opens; returns the level-0 pixels."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), GLASS, np.uint8)
    for y in range(tissue, size - tissue, 256):
        for x in range(tissue, size - tissue, 256):
            h, w = min(256, size - tissue - y), min(256, size - tissue - x)
            image[y : y + h, x : x + w] = np.rint(make_tile(rng)[0][:h, :w]).astype(np.uint8)
    head = f"Aperio Image Library v12.0.5\r\n{size}x{size} [0,0 {size}x{size}] (256x256) JPEG/RGB Q=90"
    with tifffile.TiffWriter(path) as tif:
        options = dict(tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None)
        tif.write(image, description=f"{head}|AppMag = {round(10 / mpp)}|MPP = {mpp}", **options)
        tif.write(np.ascontiguousarray(image[::4, ::4]), description=f"{head} -> {size // 4}x{size // 4}", **options)
    return image


def write_dicom_slide(folder: Path, image: np.ndarray, mpp: float = 0.25, levels: int = 2, tile: int = 256) -> None:
    """A DICOM whole-slide image as scanners and converters write it: one VL Whole Slide Microscopy file per pyramid
    level, TILED_FULL 256² JPEG frames, the pixel spacing in the shared functional groups."""
    import io

    import pydicom
    from PIL import Image as PILImage
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference, pyramid = (generate_uid() for _ in range(4))
    for level in range(levels):
        pixels = np.ascontiguousarray(image[:: 2**level, :: 2**level])
        height, width = pixels.shape[:2]
        frames = []
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                block = np.full((tile, tile, 3), 255, np.uint8)
                part = pixels[y : y + tile, x : x + tile]
                block[: part.shape[0], : part.shape[1]] = part
                buffer = io.BytesIO()
                PILImage.fromarray(block).save(buffer, format="JPEG", quality=95, subsampling=1)
                frames.append(buffer.getvalue())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PyramidUID = pyramid
        ds.Modality, ds.Manufacturer, ds.InstanceNumber = "SM", "test", level + 1
        kind = ("ORIGINAL", "NONE") if level == 0 else ("DERIVED", "RESAMPLED")
        ds.ImageType = [kind[0], "PRIMARY", "VOLUME", kind[1]]
        ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime, ds.StudyID = "", "", "20260101", "000000", ""
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.SeriesNumber = "", "", 1
        ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20260101", "000000", "20260101000000"
        ds.ContainerIdentifier, ds.ContainerTypeCodeSequence = "SLIDE_1", []
        ds.IssuerOfTheContainerIdentifierSequence, ds.SpecimenDescriptionSequence = [], []
        ds.AcquisitionContextSequence, ds.VolumetricProperties = [], "VOLUME"
        ds.BurnedInAnnotation, ds.SpecimenLabelInImage, ds.ExtendedDepthOfField = "NO", "NO", "NO"
        ds.FocusMethod = "AUTO"
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        ds.Rows = ds.Columns = tile
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
        ds.NumberOfFrames = len(frames)
        ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
        spacing_mm = mpp * 2**level / 1000
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = width * spacing_mm, height * spacing_mm, 0.0
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 0.0, 0.0
        ds.TotalPixelMatrixOriginSequence = [origin]
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        optical = Dataset()
        optical.OpticalPathIdentifier = "1"
        illumination = Dataset()
        illumination.CodeValue, illumination.CodingSchemeDesignator = "111744", "DCM"
        illumination.CodeMeaning = "Brightfield illumination"
        optical.IlluminationTypeCodeSequence = [illumination]
        colour = Dataset()
        colour.CodeValue, colour.CodingSchemeDesignator, colour.CodeMeaning = "414298005", "SCT", "Full Spectrum"
        optical.IlluminationColorCodeSequence = [colour]
        ds.OpticalPathSequence = [optical]
        measures = Dataset()
        measures.PixelSpacing = [spacing_mm, spacing_mm]
        measures.SliceThickness = 0.0
        groups = Dataset()
        groups.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [groups]
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        pydicom.dcmwrite(folder / f"level_{level}.dcm", ds, enforce_file_format=True)
