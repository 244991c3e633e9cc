"""Nasty images and annotations: every one found when the data is checked or set up, named in
one line, and never a crash halfway through an epoch."""

from __future__ import annotations

import json
import os
import re
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from focaldet.data import CocoDataModule, DataWarning, ImageError, check_dataset, load_coco, read_image, scan_images
from focaldet.data.cli import main as data_main
from focaldet.data.images import decode_image
from focaldet.errors import DataError

from helpers import ckpt_dir, tiny_config


def _photo(h=96, w=128, seed=0):
    """Smooth-ish RGB content in 16 px blocks, so JPEG artefacts stay small."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))


def _truncate(path, keep=0.7):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _nasty_folder(root):
    """One file of each kind; returns ``{file_name: (w, h)}`` of the JSON sizes."""
    root.mkdir(parents=True, exist_ok=True)
    photo = _photo()
    Image.fromarray(photo).save(root / "ok.jpg", quality=95)
    Image.fromarray(photo).save(root / "truncated.jpg", quality=95)
    _truncate(root / "truncated.jpg")
    (root / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "empty.jpg").write_bytes(b"")
    Image.fromarray(photo).save(root / "png_named.jpg", format="PNG")
    Image.fromarray(photo[..., 0]).save(root / "gray.png")
    Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 200, np.uint8)])).save(root / "rgba.png")
    cv2.imwrite(str(root / "deep.png"), (photo[..., 0].astype(np.uint16) * 257))
    Image.fromarray(photo).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned by 90 degrees when decoded: 96 x 128 (w x h)
    Image.fromarray(photo).save(root / "turned.jpg", quality=95, exif=exif)
    sizes = {name: (128, 96) for name in ("ok.jpg", "truncated.jpg", "random.jpg", "empty.jpg", "png_named.jpg",
                                          "gray.png", "rgba.png", "deep.png", "cmyk.jpg")}
    sizes["turned.jpg"] = (128, 96)  # the unturned size: what a tool ignoring EXIF writes
    return sizes


def _coco_for(root, sizes, ann_file):
    images = [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, (w, h)) in enumerate(sizes.items(), 1)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0}
            for i in range(1, len(images) + 1)]
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    return ann_file


# ----------------------------------------------------------------------------- decoding


def test_truncated_jpeg_is_read_at_every_reduction(tmp_path):
    """OpenCV (5.x) refuses a JPEG without its last bytes at any size; focaldet reads it, and
    the rows that are there are the original ones."""
    photo = _photo(192, 256)
    Image.fromarray(photo).save(tmp_path / "a.jpg", quality=95)
    full = read_image(tmp_path / "a.jpg")
    _truncate(tmp_path / "a.jpg", keep=0.8)
    buffer = np.fromfile(tmp_path / "a.jpg", np.uint8)
    assert cv2.imdecode(buffer, cv2.IMREAD_REDUCED_COLOR_2) is None  # the bug this fixes
    image = read_image(tmp_path / "a.jpg")
    assert image.shape == full.shape
    assert np.abs(image[:64].astype(int) - full[:64]).mean() < 1  # the top survives
    for reduce in (2, 4, 8):
        assert decode_image(buffer, reduce).shape == (-(-192 // reduce), -(-256 // reduce), 3)


def test_reduced_decode_falls_back_to_the_full_one(tmp_path, monkeypatch):
    Image.fromarray(_photo()).save(tmp_path / "a.jpg", quality=95)
    real = cv2.imdecode
    # IMREAD_REDUCED_* have bit 16 set: every reduced decode fails
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: None if flags & 16 else real(buf, flags))
    assert read_image(tmp_path / "a.jpg", reduce=2).shape == (48, 64, 3)


@pytest.mark.parametrize("name, detail", [("random.jpg", "corrupt or unsupported"), ("empty.jpg", "empty file")])
def test_undecodable_files_are_one_line_errors(tmp_path, name, detail):
    _nasty_folder(tmp_path)
    with pytest.raises(ImageError, match=rf"{name} \(image id 3\): not a decodable image \({detail}"):
        read_image(tmp_path / name, 3)


def test_every_format_reads_as_8_bit_rgb(tmp_path):
    _nasty_folder(tmp_path)
    reference = _photo().astype(int)
    for name, tolerance in (("png_named.jpg", 0), ("rgba.png", 0), ("cmyk.jpg", 8), ("ok.jpg", 8)):
        image = read_image(tmp_path / name)
        assert image.dtype == np.uint8 and image.shape == (96, 128, 3)
        assert np.abs(image - reference).mean() <= tolerance, name  # same colours (JPEG q95: ~4 gray levels)
    gray = read_image(tmp_path / "gray.png")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 0] == gray[..., 2]).all()
    deep = read_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(deep[..., 0], _photo()[..., 0])  # 16-bit v * 257 -> 8-bit v
    assert read_image(tmp_path / "turned.jpg").shape == (128, 96, 3)


# ----------------------------------------------------------------------------- scan and doctor


def test_scan_names_each_case(tmp_path):
    sizes = _nasty_folder(tmp_path / "images")
    scans = scan_images(tmp_path / "images", [*sizes, "missing.jpg"])
    assert {n for n, s in scans.items() if not s.ok} == {"random.jpg", "empty.jpg", "missing.jpg"}
    assert scans["missing.jpg"].status == "missing"
    assert [n for n, s in scans.items() if s.truncated] == ["truncated.jpg"]
    assert {n: s.conversion for n, s in scans.items() if s.conversion} == {
        "gray.png": "grayscale -> RGB", "rgba.png": "RGBA -> RGB (alpha dropped)",
        "deep.png": "16-bit -> 8-bit RGB", "cmyk.jpg": "CMYK -> RGB"}
    turned = scans["turned.jpg"]
    assert (turned.orientation, turned.size, turned.stored_size) == (6, (128, 96), (96, 128))
    assert "EXIF orientation 6 turns it" in turned.problem(96, 128)
    assert scans["png_named.jpg"].format == "PNG" and scans["ok.jpg"].problem(96, 128) is None


def test_scan_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    from focaldet.data import scan as scan_module

    sizes = _nasty_folder(tmp_path / "images")
    calls = []
    real = scan_module.scan_image
    monkeypatch.setattr(scan_module, "scan_image", lambda p: calls.append(p.name) or real(p))
    first = scan_images(tmp_path / "images", sizes)
    assert len(calls) == len(sizes)
    os.chmod(tmp_path / "images", 0o555)  # a read-only dataset: the cache lives elsewhere
    try:
        assert scan_images(tmp_path / "images", sizes) == first and len(calls) == len(sizes)
    finally:
        os.chmod(tmp_path / "images", 0o755)
    Image.fromarray(_photo()).save(tmp_path / "images" / "random.jpg")  # repaired: rescanned
    assert scan_images(tmp_path / "images", sizes)["random.jpg"].ok and calls[len(sizes):] == ["random.jpg"]
    cache_files = list((scan_module.cache_dir() / "image-scan").glob("images-*.json"))
    for f in cache_files:
        f.write_text("{not json")  # a corrupt cache is a rescan, never an error
    assert scan_images(tmp_path / "images", sizes) == {**first, "random.jpg": scan_images(tmp_path / "images",
                                                                                          ["random.jpg"])["random.jpg"]}


def test_data_check_reports_each_case(tmp_path, capsys):
    sizes = _nasty_folder(tmp_path / "images")
    ann = _coco_for(tmp_path / "images", sizes, tmp_path / "instances.json")
    assert data_main(["check", str(ann), "--images", str(tmp_path / "images"), "--min-size", "128"]) == 1
    out = capsys.readouterr().out
    lines = {line.split(" (")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert "error: undecodable image files" in lines
    assert "image 3 (random.jpg): not a decodable image" in lines["error: undecodable image files"]
    assert "image 4 (empty.jpg): empty file" in lines["error: undecodable image files"]
    mismatch = lines["error: images whose size differs from their JSON width/height"]
    assert "image 10 (turned.jpg): 96x128 (w x h) on disk but 128x96 in the JSON (EXIF orientation 6" in mismatch
    assert "image 2 (truncated.jpg)" in lines["warning: truncated JPEGs"]
    assert "image 10 (turned.jpg): orientation 6" in lines["info: images with an EXIF orientation, turned/flipped on reading"]
    conversions = lines["info: images converted to 8-bit RGB on reading"]
    for item in ("gray.png): grayscale", "rgba.png): RGBA", "deep.png): 16-bit", "cmyk.jpg): CMYK"):
        assert item in conversions
    assert "image 5 (png_named.jpg): PNG" in lines["info: files whose content is not the format their name says"]
    assert "result: FAILED (3 errors" not in out and "result: FAILED (2 errors, 1 warning)" in out


def test_malformed_json_is_one_line_with_the_position(tmp_path, synth_coco):
    text = synth_coco.train_ann.read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])  # a copy that stopped halfway
    with pytest.raises(DataError) as e:
        load_coco(cut)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{cut}: malformed JSON at line 1, column ")
    assert not check_dataset(cut).ok and check_dataset(cut).errors == [message]


# ----------------------------------------------------------------------------- annotations


def _rewrite(ann, edit):
    data = json.loads(ann.read_text())
    edit(data)
    ann.write_text(json.dumps(data))


@pytest.mark.parametrize("value, why", [(0, "width 0"), (-5, "width -5"), ("64", "width '64'"), (True, "width True"),
                                        (None, "width None"), (64.5, "width 64.5")])
def test_image_width_must_be_a_positive_whole_number(make_coco, value, why):
    ann, images = make_coco(images=[(64, 48), (64, 48)], annotations=[{"image_id": 2, "category_id": 1,
                                                                        "bbox": [1, 1, 5, 5]}])
    _rewrite(ann, lambda d: d["images"][1].update(width=value))
    expected = f"invalid image entries (1): image 2 (img_2.jpg): {why} is not a whole number of pixels >= 1"
    with pytest.raises(DataError) as e:
        CocoDataModule(train_ann=str(ann), train_images=str(images))  # before any training
    assert str(e.value) == f"{ann}: {expected}"
    assert check_dataset(ann).errors == [expected]  # the doctor applies the same rule


def test_many_boxes_past_the_border_suggest_xyxy(make_coco):
    boxes = [[20 + i, 5, 50, 40] for i in range(20)]  # xyxy written as xywh: x + w runs past 64
    ann, images = make_coco(images=[(64, 48)] * 20,
                            annotations=[{"image_id": i + 1, "category_id": 1, "bbox": b} for i, b in enumerate(boxes)])
    with pytest.warns(DataWarning, match=r"boxes running past the image border \(1\): 20 of 20 boxes \(100%\).*"
                                         r"\[x1, y1, x2, y2\] \(xyxy\) instead of COCO's \[x, y, width, height\]"):
        load_coco(ann)
    assert any("xyxy" in w for w in check_dataset(ann).warnings)


# ----------------------------------------------------------------------------- data module and fit


def _dataset_with(make_coco, tmp_path, spoil):
    """A 6-image train set (64x48 JPEGs), ``spoil(images_dir)`` applied."""
    ann, images = make_coco(images=[(64, 48)] * 6, annotations=[
        {"image_id": i, "category_id": 1, "bbox": [8, 8, 30, 24]} for i in range(1, 7)])
    spoil(images)
    return ann, images


def test_setup_lists_every_bad_image_at_once(make_coco, tmp_path):
    def spoil(images):
        (images / "img_2.jpg").write_bytes(b"")
        (images / "img_4.jpg").write_bytes(b"\x89PNG garbage")
        (images / "img_5.jpg").unlink()

    ann, images = _dataset_with(make_coco, tmp_path, spoil)
    dm = CocoDataModule(train_ann=str(ann), train_images=str(images), val_ann=str(ann), val_images=str(images),
                        num_workers=0, min_size=64, max_size=64)
    with pytest.raises(ImageError) as e:
        dm.setup("fit")
    assert str(e.value) == (
        f"3 bad images in {images} (for {ann}): "
        "img_2.jpg (image id 2): empty file (0 bytes); "
        "img_4.jpg (image id 4): not a decodable image (corrupt or unsupported format); "
        "img_5.jpg (image id 5): file not found (data.bad_images: skip drops them)")

    dm = CocoDataModule(train_ann=str(ann), train_images=str(images), val_ann=str(ann), val_images=str(images),
                        num_workers=0, min_size=64, max_size=64, bad_images="skip", predict_images=str(images))
    with pytest.warns(DataWarning, match=r"skipping 3 bad images .* and their 3 boxes \(data.bad_images: skip\): "
                                         r"img_2.jpg \(image id 2\): empty file"):
        dm.setup("fit")
    assert dm.datasets["train"].image_ids == [1, 3, 6]
    assert sorted(dm.coco_gt("val").getImgIds()) == [1, 3, 6]  # evaluated without them too
    assert len(dm.coco_gt("val").getAnnIds()) == 3
    with pytest.warns(DataWarning, match=r"skipping 2 bad images"):  # img_5 is not in the folder at all
        dm.setup("predict")
    assert dm.datasets["predict"].files == ["img_1.jpg", "img_3.jpg", "img_6.jpg"]


def _fit(tmp_path, synth_coco, **overrides) -> int:
    from focaldet.cli import main

    return main(["fit", "-c", str(tiny_config(tmp_path, synth_coco, **{"trainer.max_steps": 2,
                                                                        "trainer.val_check_interval": 2, **overrides}))])


def _spoiled_synth(tmp_path, synth_coco, spoil):
    """A copy of the synthetic set's images with ``spoil(folder, train_file_names)`` applied."""
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(synth_coco.images, folder)
    names = [img["file_name"] for img in json.loads(synth_coco.train_ann.read_text())["images"]]
    spoil(folder, names)
    return synth_coco._replace(images=folder)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_fit_reads_a_truncated_jpeg_and_skips_undecodable_ones(tmp_path, synth_coco, monkeypatch, capsys):
    data = _spoiled_synth(tmp_path, synth_coco, lambda folder, names: (
        _truncate(folder / names[0], keep=0.6), (folder / names[1]).write_bytes(b"not an image")))
    expected = rf"1 bad image in .*: {names_of(synth_coco)[1]} \(image id \d+\): not a decodable image"
    monkeypatch.setenv("FOCALDET_DEBUG", "1")  # the exception itself
    with pytest.raises(ImageError, match=expected):
        _fit(tmp_path / "a", data)
    assert not list((tmp_path / "a" / "run").rglob("*.ckpt"))  # failed at setup, before training
    monkeypatch.delenv("FOCALDET_DEBUG")
    capsys.readouterr()
    assert _fit(tmp_path / "a", data) == 1  # what a user sees: one line
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("focaldet: error: ")]
    assert len(err) == 1 and re.search(expected, err[0]), err

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path / "b", data, **{"data.bad_images": "skip"})
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any(m.startswith("skipping 1 bad image") and names_of(synth_coco)[1] in m for m in messages)
    assert any("is a truncated JPEG" in m and names_of(synth_coco)[0] in m for m in messages)
    assert (ckpt_dir(tmp_path / "b" / "run") / "last.ckpt").is_file()


def names_of(synth_coco):
    return [img["file_name"] for img in json.loads(synth_coco.train_ann.read_text())["images"]]
