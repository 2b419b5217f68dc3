"""Dataset loaders: every format round-trips, DICOM semantics are right, bad input fails clearly."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pluggy
import pydicom
import pytest
import torch
from PIL import Image

from medaudit import hookspecs
from medaudit.config import Config
from medaudit.data import preprocess
from medaudit.errors import DataError
from medaudit.plugins import data_loaders
from medaudit.plugins.data_loaders import ManifestDataset, NpzDataset, parse_dicom_age

PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
CT_SMALL = PYDICOM_DATA / "CT_small.dcm"
MR_SMALL = PYDICOM_DATA / "MR_small.dcm"
MR_TRUNCATED = PYDICOM_DATA / "MR_truncated.dcm"
RTDOSE = PYDICOM_DATA / "rtdose.dcm"  # multi-frame: 15 frames of 10×10
CR_MONO1 = PYDICOM_DATA / "dicomdirtests" / "77654033" / "CR1" / "6154"  # MONOCHROME1, slope 0.684, intercept 200
CT_SERIES = PYDICOM_DATA / "dicomdirtests" / "98892001" / "CT5N"  # 5 axial slices, z descending with InstanceNumber


def cfg(dims: int | str = 2, channels: int = 1, task: str = "multiclass", classes: list[str] | None = None, **inp: Any) -> Config:
    return Config.model_validate({
        "input": {"dims": dims, "channels": channels, **inp},
        "task": {"type": task, "classes": classes or []},
    })


def open_ds(path: Path, config: Config) -> Any:
    """Open through a real pluggy manager, so the hookimpl's signature is checked against the spec."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(data_loaders)
    return pm.hook.medaudit_open_dataset(path=path, config=config)


def write_manifest(folder: Path, rows: list[str], header: str = "path,label") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return folder / "manifest.csv"


def test_plugin_declares_api_version() -> None:
    assert data_loaders.MEDAUDIT_API_VERSION == hookspecs.HOOK_API_VERSION


# ---------------------------------------------------------------------------------------------
# Manifest formats
# ---------------------------------------------------------------------------------------------


def test_png_8_and_16_bit_with_metadata_and_unicode_paths(tmp_path: Path) -> None:
    root = tmp_path / "ünï códe set"
    (root / "sub dir").mkdir(parents=True)
    rng = np.random.default_rng(0)
    img8 = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    img16 = rng.integers(0, 65536, (12, 10), dtype=np.uint16)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(img8).save(root / "sub dir" / "scan é 1.png")
    Image.fromarray(img16).save(root / "img16.png")
    Image.fromarray(rgb).save(root / "colour.png")
    write_manifest(root, [
        '"sub dir/scan é 1.png",benign,F,45,siteA',
        "img16.png,malignant,,60.5,007",
        "colour.png,benign,M,,siteB",
    ], header="path,label,sex,age,site")
    ds = open_ds(root, cfg(classes=["benign", "malignant"]))
    assert isinstance(ds, ManifestDataset)
    assert ds.labels.tolist() == [0, 1, 0]
    assert ds.metadata["sex"] == ["F", None, "M"]  # empty cell → missing
    assert ds.metadata["age"] == [45.0, 60.5, None]  # numeric column parsed for binning
    assert ds.metadata["site"] == ["siteA", "007", "siteB"]
    np.testing.assert_array_equal(ds.read(0), img8[None])
    r16 = ds.read(1)
    assert r16.shape == (1, 12, 10) and r16.max() > 255
    np.testing.assert_array_equal(r16[0], img16)
    np.testing.assert_array_equal(ds.read(2), np.moveaxis(rgb, -1, 0))
    x, idx, _ = ds[2]  # RGB to a 1-channel model becomes luminance in [0, 1]
    assert tuple(x.shape) == (1, 12, 10) and idx == 2 and float(x.min()) >= 0 and float(x.max()) <= 1
    ident = ds.identity()
    assert ident.class_counts == {"benign": 2, "malignant": 1} and ident.format == "manifest"


def test_tiff_16_bit_and_multipage_stack(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4096, (8, 9), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "a.tif")
    pages = [Image.fromarray((np.full((6, 7), 10 * k)).astype(np.uint8)) for k in range(4)]
    pages[0].save(tmp_path / "stack.tiff", save_all=True, append_images=pages[1:])
    write_manifest(tmp_path, ["a.tif,0", "stack.tiff,1"])
    ds = open_ds(tmp_path, cfg(dims=2))
    np.testing.assert_array_equal(ds.read(0)[0], a)
    vol = ds.read(1)
    assert vol.shape == (1, 4, 6, 7) and vol[0, 3, 0, 0] == 30
    with pytest.raises(DataError, match=r"stack\.tiff.*3 spatial dimensions.*input\.dims is 2"):
        ds[1]


def test_npy_channel_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    grey = rng.random((10, 11)).astype(np.float32)
    rgb_last = rng.random((10, 11, 3)).astype(np.float32)
    chw = rng.random((3, 10, 11)).astype(np.float32)
    np.save(tmp_path / "grey.npy", grey)
    np.save(tmp_path / "rgb_last.npy", rgb_last)
    np.save(tmp_path / "chw.npy", chw)
    csv = write_manifest(tmp_path, ["grey.npy,a", "rgb_last.npy,b", "chw.npy,a"])
    ds = open_ds(csv, cfg(channels=3))
    assert ds.classes == ["a", "b"]  # inferred when task.classes is empty
    np.testing.assert_array_equal(ds.read(0), grey[None])
    np.testing.assert_array_equal(ds.read(1), np.moveaxis(rgb_last, -1, 0))
    np.testing.assert_array_equal(ds.read(2), chw)
    # the first image is grey: grey images stay 1-channel (replicated on the device after perturbation),
    # and a colour image in such a set is an error naming it
    assert tuple(ds[0][0].shape) == (1, 10, 11)
    with pytest.raises(DataError, match=r"rgb_last.npy.*3 channels, but the data set's first image is grey"):
        ds[1]
    # a colour-first set replicates its grey images when they are loaded
    csv = write_manifest(tmp_path, ["chw.npy,a", "grey.npy,a", "rgb_last.npy,b"])
    ds = open_ds(csv, cfg(channels=3))
    assert tuple(ds[1][0].shape) == (3, 10, 11)
    assert torch.equal(ds[1][0][0], ds[1][0][2])


def test_nifti_3d_2d_and_big_endian(tmp_path: Path) -> None:
    vol = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    slice2d = np.arange(20, dtype=np.float32).reshape(4, 5, 1)
    nib.save(nib.Nifti1Image(slice2d, np.eye(4)), tmp_path / "slice.nii")
    shutil.copy(NIBABEL_DATA / "anatomical.nii", tmp_path / "anatomical.nii")  # real big-endian int16 file
    write_manifest(tmp_path, ["vol.nii.gz,0", "anatomical.nii,1"])
    ds = open_ds(tmp_path, cfg(dims=3, spatial_size=[8, 8, 8]))
    np.testing.assert_array_equal(ds.read(0), vol[None])
    big = ds.read(1)
    assert big.dtype.byteorder == ">" and big.shape == (1, 33, 41, 25)
    x, *_ = ds[1]  # preprocess must cope with non-native byte order
    expected = preprocess(big.astype(np.int16), ds.input_cfg, "native copy")
    assert tuple(x.shape) == (1, 8, 8, 8) and torch.equal(x, expected)

    csv2 = tmp_path / "two_d.csv"
    csv2.write_text("path,label\nslice.nii,0\nvol.nii.gz,1\n", encoding="utf-8")
    ds2 = open_ds(csv2, cfg(dims=2))
    np.testing.assert_array_equal(ds2.read(0), slice2d[:, :, 0][None])
    with pytest.raises(DataError, match=r"two_d\.csv, row 2 \(vol\.nii\.gz\): is a 3-D volume .*input\.dims: 3"):
        ds2.read(1)


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


def test_dicom_rescale_to_hounsfield_and_header_metadata(tmp_path: Path) -> None:
    shutil.copy(CT_SMALL, tmp_path / "ct.dcm")
    shutil.copy(MR_SMALL, tmp_path / "mr.dcm")
    write_manifest(tmp_path, ["ct.dcm,1", "mr.dcm,0"])
    ds = open_ds(tmp_path, cfg())
    hu = ds.read(0)
    raw = pydicom.dcmread(CT_SMALL).pixel_array
    np.testing.assert_allclose(hu[0], raw.astype(np.float32) - 1024)  # RescaleIntercept -1024, slope 1
    # Air around the patient is near -1000 HU, soft tissue near 0.
    assert -1100 < np.percentile(hu, 1) < -700
    assert -200 < np.median(hu) < 200
    md = ds.metadata
    assert md["PatientSex"] == ["O", "F"]
    assert md["PatientAge"] == [0.0, None]  # CT_small says "000Y"; MR_small has no age
    assert md["Manufacturer"] == ["GE MEDICAL SYSTEMS", "TOSHIBA_MEC"]
    assert md["KVP"] == [120.0, None]
    assert md["SliceThickness"] == [5.0, 0.8]
    assert "MagneticFieldStrength" not in md or md["MagneticFieldStrength"][0] is None


def test_manifest_column_wins_over_dicom_header(tmp_path: Path) -> None:
    shutil.copy(CT_SMALL, tmp_path / "ct.dcm")
    write_manifest(tmp_path, ["ct.dcm,1,X"], header="path,label,patientsex")
    ds = open_ds(tmp_path, cfg())
    assert ds.metadata["patientsex"] == ["X"] and "PatientSex" not in ds.metadata
    assert ds.metadata["Manufacturer"] == ["GE MEDICAL SYSTEMS"]


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    shutil.copy(CR_MONO1, tmp_path / "cr")  # no extension: recognised by the DICM marker
    write_manifest(tmp_path, ["cr,1"])
    ds = open_ds(tmp_path, cfg())
    out = ds.read(0)[0]
    header = pydicom.dcmread(CR_MONO1)
    assert header.PhotometricInterpretation == "MONOCHROME1" and header.BitsStored == 12
    raw = header.pixel_array.astype(np.float64)
    np.testing.assert_allclose(out, (4095 - raw) * 0.684 + 200, rtol=1e-5)
    assert np.unravel_index(out.argmin(), out.shape) == np.unravel_index(raw.argmax(), raw.shape)
    assert ds.metadata["PatientAge"] == [47.0]


def test_dicom_series_folder_sorted_by_position(tmp_path: Path) -> None:
    series = tmp_path / "séries one"
    series.mkdir()
    files = sorted(CT_SERIES.iterdir())
    for k, f in enumerate(files):  # names chosen so that name order ≠ anatomical order
        shutil.copy(f, series / f"slice_{k}.dcm")
    write_manifest(tmp_path, ['"séries one",tumour'])
    ds = open_ds(tmp_path, cfg(dims=3))
    vol = ds.read(0)
    assert vol.shape == (1, 5, 16, 16)
    headers = [pydicom.dcmread(f) for f in files]
    by_z = sorted(headers, key=lambda h: float(h.ImagePositionPatient[2]))
    assert [int(h.InstanceNumber) for h in by_z] == [10, 9, 8, 7, 6]
    for z, h in enumerate(by_z):
        np.testing.assert_allclose(vol[0, z], h.pixel_array.astype(np.float32) - 1024)
    assert tuple(ds[0][0].shape) == (1, 5, 16, 16)
    assert "Manufacturer" in ds.metadata


def test_dicom_multiframe_is_a_volume(tmp_path: Path) -> None:
    shutil.copy(RTDOSE, tmp_path / "dose.dcm")
    write_manifest(tmp_path, ["dose.dcm,0"])
    vol = open_ds(tmp_path, cfg(dims=3)).read(0)
    assert vol.shape == (1, 15, 10, 10)
    ds2 = open_ds(tmp_path, cfg(dims=2))
    with pytest.raises(DataError, match=r"row 1 \(dose\.dcm\): image has 3 spatial dimensions"):
        ds2[0]


@pytest.mark.parametrize(("age", "years"), [
    ("045Y", 45.0), ("006M", 0.5), ("002W", round(14 / 365.25, 4)), ("010D", round(10 / 365.25, 4)),
    ("45", 45.0), ("", None), ("abc", None), (None, None),
])
def test_parse_dicom_age(age: str | None, years: float | None) -> None:
    assert parse_dicom_age(age) == years


def test_dicom_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    shutil.copy(CT_SMALL, tmp_path / "a.dcm")
    with pytest.raises(DataError, match=r"no manifest\.csv.*labels are unknown"):
        open_ds(tmp_path, cfg())


def test_unrelated_paths_are_left_to_other_plugins(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert open_ds(tmp_path, cfg()) is None
    assert open_ds(tmp_path / "notes.txt", cfg()) is None


# ---------------------------------------------------------------------------------------------
# NPZ
# ---------------------------------------------------------------------------------------------


def test_npz_memmapped_with_metadata_and_worker_pickling(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    labels = np.array([[0], [1], [2], [1], [0], [2]], dtype=np.uint8)  # MedMNIST's (N, 1)
    p = tmp_path / "set.npz"
    np.savez(p, images=images, labels=labels, meta_sex=np.array(["F", "M", "", "F", "M", "F"]),
             meta_age=np.array([30.0, np.nan, 50, 61, 70, 80]))
    ds = open_ds(p, cfg(classes=["a", "b", "c"]))
    assert isinstance(ds, NpzDataset) and isinstance(ds._memmap, np.memmap)
    assert ds.labels.tolist() == [0, 1, 2, 1, 0, 2]
    assert ds.metadata["sex"] == ["F", "M", None, "F", "M", "F"]
    assert ds.metadata["age"][:3] == [30.0, None, 50.0]
    np.testing.assert_array_equal(ds.read(4), images[4][None])
    clone = pickle.loads(pickle.dumps(ds))  # as DataLoader workers under spawn receive it
    assert clone._images is None
    np.testing.assert_array_equal(clone.read(5), images[5][None])
    assert len(pickle.dumps(ds)) < images.nbytes + 4000 or images.nbytes < 4000
    assert ds.content_hash() == clone.content_hash()


def test_npz_medmnist_keys_compressed_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (4, 7, 7, 3), dtype=np.uint8)
    p = tmp_path / "dermamnist.npz"
    np.savez_compressed(p, train_images=rgb[:1], train_labels=np.zeros((1, 1)), test_images=rgb,
                        test_labels=np.array([[1], [0], [1], [1]]))
    ds = open_ds(p, cfg(channels=3))
    assert ds._memmap is None and ds.channels_last
    np.testing.assert_array_equal(ds.read(2), np.moveaxis(rgb[2], -1, 0))
    assert ds.labels.tolist() == [1, 0, 1, 1]


def test_npz_3d_volumes_and_multilabel(tmp_path: Path) -> None:
    vols = np.zeros((3, 8, 5, 6), dtype=np.float32)
    multi = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1]])
    p = tmp_path / "vol.npz"
    np.savez(p, images=vols, labels=multi)
    ds = open_ds(p, cfg(dims=3, task="multilabel", classes=["x", "y", "z"]))
    assert ds.read(0).shape == (1, 8, 5, 6)
    np.testing.assert_array_equal(ds.labels, multi)
    assert ds.class_counts() == {"x": 1, "y": 1, "z": 2}
    with pytest.raises(DataError, match=r"vol\.npz.*several per image.*task\.type: multilabel"):
        open_ds(p, cfg(dims=3))
    with pytest.raises(DataError, match=r"vol\.npz.*8 channels per 2-D image.*set input\.dims: 3"):
        open_ds(p, cfg(dims=2, task="multilabel", classes=["x", "y", "z"]))


def test_npz_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    p = tmp_path / "evil.npz"
    np.savez(p, images=np.zeros((2, 4, 4)), labels=np.array([0, 1]), meta_site=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match=r"evil\.npz.*'meta_site' holds Python objects"):
        open_ds(p, cfg())


def test_npz_bad_keys_and_shapes(tmp_path: Path) -> None:
    p = tmp_path / "odd.npz"
    np.savez(p, x=np.zeros((2, 4, 4)), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"odd\.npz: expected arrays 'images' and 'labels'.*\['x', 'y'\]"):
        open_ds(p, cfg())
    q = tmp_path / "flat.npz"
    np.savez(q, images=np.zeros((2, 16)), labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"flat\.npz.*1 dimensions per image, but input\.dims is 2"):
        open_ds(q, cfg())
    r = tmp_path / "count.npz"
    np.savez(r, images=np.zeros((3, 4, 4)), labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"count\.npz.*3 images but 'labels' has shape \(2,\)"):
        open_ds(r, cfg())


# ---------------------------------------------------------------------------------------------
# input.dims: auto (the default), read from the data when it is opened
# ---------------------------------------------------------------------------------------------


def test_default_dims_is_auto() -> None:
    assert Config().input.dims == "auto"


def test_auto_dims_from_manifest_files(tmp_path: Path) -> None:
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    nib.save(nib.Nifti1Image(vol[:, :, :1], np.eye(4)), tmp_path / "slice.nii")  # (X, Y, 1): a 2-D image
    _png(tmp_path / "a.png")
    np.save(tmp_path / "stack.npy", np.zeros((7, 5, 6), dtype=np.float32))  # no channel axis of 1/3/4: a volume
    np.save(tmp_path / "rgb.npy", np.zeros((5, 6, 3), dtype=np.float32))  # channels-last RGB: 2-D
    CT_SERIES_COPY = tmp_path / "series"
    shutil.copytree(CT_SERIES, CT_SERIES_COPY)
    expected = {"vol.nii.gz": (3, (1, 4, 5, 6)), "slice.nii": (2, (1, 4, 5)), "a.png": (2, (1, 6, 6)),
                "stack.npy": (3, (1, 7, 5, 6)), "rgb.npy": (2, (1, 5, 6)), "series": (3, None)}
    for name, (dims, shape) in expected.items():
        csv_path = tmp_path / f"{name}.csv"
        csv_path.write_text(f"path,label\n{name},0\n", encoding="utf-8")
        ds = open_ds(csv_path, cfg(dims="auto"))
        assert ds.input_cfg.dims == dims and type(ds.input_cfg.dims) is int, name
        if shape is not None:
            assert tuple(ds[0][0].shape) == shape, name
    # rows are read as the first one says: a 2-D image after a volume fails when it is read, naming its row
    mixed = write_manifest(tmp_path, ["vol.nii.gz,0", "a.png,1"])
    ds = open_ds(mixed, cfg(dims="auto"))
    with pytest.raises(DataError, match=r"manifest\.csv, row 2 \(a\.png\).*2 spatial dimensions.*input\.dims is 3"):
        ds[1]
    with pytest.raises(DataError, match=r"vol\.nii\.gz\.csv: the images are 3-D \(input\.dims: auto\), but "
                                        r"input\.spatial_size has 2 values \[8, 8\]"):
        open_ds(tmp_path / "vol.nii.gz.csv", cfg(dims="auto", spatial_size=[8, 8]))


def test_preprocess_outside_an_audit_takes_auto_dims_from_the_image() -> None:
    """A loader opened directly (the conformance kit) may leave dims auto: the image's own axes count."""
    auto = Config().input
    assert tuple(preprocess(np.zeros((1, 4, 5, 6), np.float32), auto, "v").shape) == (1, 4, 5, 6)
    assert tuple(preprocess(np.zeros((1, 4, 5), np.float32), auto, "i").shape) == (1, 4, 5)
    sized = Config.model_validate({"input": {"spatial_size": [8, 8]}}).input
    with pytest.raises(DataError, match=r"^v: image is 3-D, but input\.spatial_size has 2 values$"):
        preprocess(np.zeros((1, 4, 5, 6), np.float32), sized, "v")
    with pytest.raises(DataError, match=r"^f: image has 4 spatial dimensions .*but input\.dims is auto$"):
        preprocess(np.zeros((1, 2, 3, 4, 5), np.float32), auto, "f")


def test_auto_dims_from_npz_shape(tmp_path: Path) -> None:
    cases = {(4, 8, 8): 2, (4, 1, 8, 8): 2, (4, 8, 8, 3): 2, (4, 6, 8, 8): 3, (4, 1, 6, 8, 8): 3}
    for shape, dims in cases.items():
        p = tmp_path / f"{'x'.join(map(str, shape))}.npz"
        np.savez(p, images=np.zeros(shape, dtype=np.uint8), labels=np.array([0, 1, 0, 1]))
        ds = open_ds(p, cfg(dims="auto"))
        assert ds.input_cfg.dims == dims, shape
        assert ds[0][0].ndim == dims + 1, shape
    # [N, 2, H, W] reads as 2-D two-channel images for a 2-channel model, as [D, H, W] volumes otherwise
    p = tmp_path / "two.npz"
    np.savez(p, images=np.zeros((4, 2, 8, 8), dtype=np.uint8), labels=np.array([0, 1, 0, 1]))
    assert open_ds(p, cfg(dims="auto", channels=2)).input_cfg.dims == 2
    assert open_ds(p, cfg(dims="auto")).input_cfg.dims == 3
    flat = tmp_path / "flat.npz"
    np.savez(flat, images=np.zeros((2, 16)), labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"flat\.npz: 'images' has shape \(2, 16\): 1 dimensions per image, neither"):
        open_ds(flat, cfg(dims="auto"))


# ---------------------------------------------------------------------------------------------
# Unlabelled data sets (what an --ood-data set may be) and labels the model cannot output
# ---------------------------------------------------------------------------------------------


def test_unlabelled_npz(tmp_path: Path) -> None:
    images = np.random.default_rng(5).integers(0, 256, (3, 6, 6), dtype=np.uint8)
    p = tmp_path / "ood.npz"
    np.savez(p, images=images, meta_site=np.array(["a", "b", "a"]))
    ds = open_ds(p, cfg(classes=["x", "y"]))
    assert ds.labels is None and ds.class_counts() == {} and ds.identity().class_counts == {}
    assert ds.unlabelled == "it holds no labels array (arrays: ['images', 'meta_site'])"
    assert ds.metadata == {"site": ["a", "b", "a"]}
    np.testing.assert_array_equal(ds.read(1), images[1][None])
    q = tmp_path / "medmnist.npz"
    np.savez(q, test_images=images, train_images=images, train_labels=np.array([0, 1, 0]))
    assert open_ds(q, cfg()).unlabelled.startswith("it holds no test_labels array")


def test_label_errors_name_row_sample_and_value(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 7, 1])
    np.savez(p, images=np.zeros((18, 4, 4), dtype=np.uint8), labels=labels)
    with pytest.raises(DataError, match=r"^.*d\.npz \('labels'\): row 17 \(sample id '16'\) has label 7, but task\.classes "
                                        r"names 3 classes \(0–2\): csf_other, grey_matter, white_matter$"):
        open_ds(p, cfg(classes=["csf_other", "grey_matter", "white_matter"]))
    # classes not configured: 0-7 would be inferred with 3-6 empty, so the stray row is named instead
    with pytest.raises(DataError, match=r"row 17 \(sample id '16'\) has label 7, but no label is 3–6; task\.classes is "
                                        r"not set, so the classes would be inferred as 0–7 \(8 classes, 4 without a sample\)"):
        open_ds(p, cfg())
    np.savez(p, images=np.zeros((4, 4, 4), dtype=np.uint8), labels=np.array([1, 2, 3, 1]))
    with pytest.raises(DataError, match=r"row 1 \(sample id '0'\) has label 1, but no label is 0 \(are the labels 1-based\?\)"):
        open_ds(p, cfg())
    np.savez(p, images=np.zeros((3, 4, 4), dtype=np.uint8), labels=np.array([0, -1, 1]))
    with pytest.raises(DataError, match=r"row 2 \(sample id '1'\) has label -1; an integer label is a class index, 0 or above"):
        open_ds(p, cfg())
    # gap-free inferred classes, and a binary set of positives only, are no guess
    np.savez(p, images=np.zeros((3, 4, 4), dtype=np.uint8), labels=np.array([1, 1, 1]))
    assert open_ds(p, cfg(task="binary")).classes == ["0", "1"]
    np.savez(p, images=np.zeros((3, 4, 4), dtype=np.uint8), labels=np.array([2, 0, 1]))
    assert open_ds(p, cfg()).classes == ["0", "1", "2"]


def test_unknown_multilabel_name_names_row_and_sample(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    write_manifest(tmp_path, ["a.png,x|y", "b.png,y|w"])
    with pytest.raises(DataError, match=r"manifest\.csv: row 2 \(sample id 'b\.png'\) has label 'w', but task\.classes "
                                        r"names 3 classes \(0–2\): x, y, z$"):
        open_ds(tmp_path, cfg(task="multilabel", classes=["x", "y", "z"]))


# ---------------------------------------------------------------------------------------------
# Bad input: each names the file (and row) and says what to do
# ---------------------------------------------------------------------------------------------


def _png(path: Path, value: int = 7) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6), value, dtype=np.uint8)).save(path)


def test_missing_files_are_found_at_open_time(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png")
    write_manifest(tmp_path, ["ok.png,0", "gone one.png,1", "gone2.png,1"])
    with pytest.raises(DataError, match=r"manifest\.csv, row 2: file 'gone one\.png' does not exist.*1 more missing.*gone2\.png"):
        open_ds(tmp_path, cfg())


def test_truncated_png_fails_at_read_time(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    write_manifest(tmp_path, ["ok.png,0", "cut.png,1"])
    ds = open_ds(tmp_path, cfg())  # opening is cheap: no decoding yet
    ds.read(0)
    with pytest.raises(DataError, match=r"row 2 \(cut\.png\): cannot decode image file .*truncated or corrupt"):
        ds.read(1)


def test_truncated_dicom_fails_at_read_time(tmp_path: Path) -> None:
    shutil.copy(MR_TRUNCATED, tmp_path / "mr_cut.dcm")
    write_manifest(tmp_path, ["mr_cut.dcm,0", "mr_cut.dcm,1"])
    ds = open_ds(tmp_path, cfg())
    with pytest.raises(DataError, match=r"row 1 \(mr_cut\.dcm\): cannot decode dicom file"):
        ds.read(0)


def test_garbage_dicom_header_fails_at_open_time(tmp_path: Path) -> None:
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all")
    write_manifest(tmp_path, ["junk.dcm,0"])
    with pytest.raises(DataError, match=r"row 1: 'junk\.dcm' is not a readable DICOM file"):
        open_ds(tmp_path, cfg())


def test_label_not_in_class_list(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    write_manifest(tmp_path, ["a.png,benign", "b.png,malignnat"])
    with pytest.raises(DataError, match=r"manifest\.csv: row 2 \(sample id 'b\.png'\) has label 'malignnat', but "
                                        r"task\.classes names 2 classes \(0–1\): benign, malignant$"):
        open_ds(tmp_path, cfg(classes=["benign", "malignant"]))


def test_binary_task_with_three_inferred_classes(tmp_path: Path) -> None:
    for n in "abc":
        _png(tmp_path / f"{n}.png")
    write_manifest(tmp_path, ["a.png,x", "b.png,y", "c.png,z"])
    with pytest.raises(DataError, match=r"manifest\.csv: a binary task needs exactly 2 classes"):
        open_ds(tmp_path, cfg(task="binary"))


def test_nan_pixels(tmp_path: Path) -> None:
    arr = np.ones((5, 5), dtype=np.float32)
    arr[2, 2] = np.nan
    np.save(tmp_path / "nan.npy", arr)
    write_manifest(tmp_path, ["nan.npy,0"])
    ds = open_ds(tmp_path, cfg())
    with pytest.raises(DataError, match=r"row 1 \(nan\.npy\): image contains NaN or Inf"):
        ds[0]


def test_empty_manifest(tmp_path: Path) -> None:
    write_manifest(tmp_path, [])
    with pytest.raises(DataError, match=r"manifest\.csv: the dataset is empty"):
        open_ds(tmp_path, cfg())
    (tmp_path / "blank.csv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.csv: manifest is empty"):
        open_ds(tmp_path / "blank.csv", cfg())
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(DataError, match=r"nothing: the dataset folder is empty"):
        open_ds(empty_dir, cfg())


def test_missing_required_columns(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    write_manifest(tmp_path, ["a.png,0"], header="file,label")
    with pytest.raises(DataError, match=r"manifest\.csv: manifest has no 'path' column.*\['file', 'label'\]"):
        open_ds(tmp_path, cfg())
    write_manifest(tmp_path, ["a.png"], header="path")
    unlabelled = open_ds(tmp_path, cfg())  # an unlabelled set: whether its role needs labels is the core's call
    assert unlabelled.labels is None and unlabelled.class_counts() == {}
    assert unlabelled.unlabelled == "the manifest has no 'label' column (columns: ['path'])"


def test_unsupported_extension_and_empty_label(tmp_path: Path) -> None:
    (tmp_path / "scan.xyz").write_bytes(b"\0" * 200)
    write_manifest(tmp_path, ["scan.xyz,0"])
    with pytest.raises(DataError, match=r"row 1: 'scan\.xyz' is not a supported image file"):
        open_ds(tmp_path, cfg())
    _png(tmp_path / "a.png")
    write_manifest(tmp_path, ["a.png,"])
    with pytest.raises(DataError, match=r"row 1 \(a\.png\): empty 'label' cell"):
        open_ds(tmp_path, cfg())


def test_npy_object_array_refused_at_read(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    write_manifest(tmp_path, ["obj.npy,0"])
    with pytest.raises(DataError, match=r"row 1 \(obj\.npy\): array holds Python objects"):
        open_ds(tmp_path, cfg()).read(0)


# ---------------------------------------------------------------------------------------------
# Identity and other manifest features
# ---------------------------------------------------------------------------------------------


def test_content_hash_tracks_file_bytes(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    write_manifest(tmp_path, ["a.png,0", "b.png,1"])
    h1 = open_ds(tmp_path, cfg()).content_hash()
    assert h1 == open_ds(tmp_path, cfg()).content_hash() and len(h1) == 64
    _png(tmp_path / "b.png", 3)
    h2 = open_ds(tmp_path, cfg()).content_hash()
    assert h2 != h1
    write_manifest(tmp_path, ["a.png,1", "b.png,1"])  # same files, relabelled
    assert open_ds(tmp_path, cfg()).content_hash() not in (h1, h2)


def test_direct_csv_absolute_paths_and_multilabel_cells(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    csv = tmp_path / "lists" / "test split.csv"
    csv.parent.mkdir()
    csv.write_text(f"Path,Label\n{tmp_path / 'imgs' / 'a.png'},effusion|nodule\n../imgs/b.png,\n", encoding="utf-8")
    ds = open_ds(csv, cfg(task="multilabel", classes=["effusion", "nodule", "mass"]))
    assert ds.labels.tolist() == [[1, 1, 0], [0, 0, 0]]
    assert ds.describe_sample(1).endswith("row 2 (../imgs/b.png)")
