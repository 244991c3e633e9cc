"""COCO dataset: sample format, label mapping, crowd/degenerate handling, error messages."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader

from focaldet.data import (
    CocoDetection,
    DataWarning,
    ImageFolderDataset,
    LabelMap,
    collate_detection,
    load_coco,
    write_synthetic_coco,
)
from focaldet.data.transforms import ResizeShortestEdge
from focaldet.errors import DataError

from helpers import first_batch_error

# ----------------------------------------------------------------------------- LabelMap


def test_label_map_sorts_ids_and_maps_both_ways():
    lm = LabelMap.from_categories([{"id": 7, "name": "c"}, {"id": 1, "name": "a"}, {"id": 3, "name": "b"}])
    assert lm.num_classes == 3
    assert lm.cat_ids == [1, 3, 7] and lm.names == ["a", "b", "c"]
    assert [lm.to_label(c) for c in (1, 3, 7)] == [0, 1, 2]
    ids = lm.to_cat_id(torch.tensor([[2, 0], [1, 1]]))
    assert ids.dtype == torch.int64 and ids.tolist() == [[7, 1], [3, 3]]
    with pytest.raises(DataError, match="category id 5"):
        lm.to_label(5)
    with pytest.raises(DataError, match=r"labels must lie in 0..2"):
        lm.to_cat_id(torch.tensor([0, -1]))  # e.g. collate padding


def test_label_map_dict_roundtrip_is_plain_lists():
    lm = LabelMap([12, 4], ["x", "y"])
    state = lm.to_dict()
    assert state == {"cat_ids": [4, 12], "names": ["y", "x"]}
    assert json.loads(json.dumps(state)) == state
    assert LabelMap.from_dict(state) == lm


# ----------------------------------------------------------------------------- samples


def test_sample_format(synth_coco):
    ds = CocoDetection(synth_coco.train_ann, synth_coco.images)
    assert len(ds) == 12
    assert ds.label_map.cat_ids == [1, 3, 7, 8]
    s = ds[0]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 128, 128)
    assert s["boxes"].dtype == torch.float32 and s["boxes"].shape[1] == 4
    assert s["labels"].dtype == torch.int64 and s["labels"].shape == (len(s["boxes"]),)
    assert isinstance(s["image_id"], int) and s["image_id"] == ds.image_ids[0]
    assert s["orig_size"] == (128, 128) and s["size"] == (128, 128)
    assert s["file_name"].endswith(".jpg")


def test_boxes_and_labels_match_json(synth_coco):
    ds = CocoDetection(synth_coco.train_ann, synth_coco.images)
    data = json.loads(synth_coco.train_ann.read_text())
    for i in range(len(ds)):
        s = ds[i]
        anns = [a for a in data["annotations"] if a["image_id"] == s["image_id"]]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        torch.testing.assert_close(s["boxes"], expected)
        assert ds.label_map.to_cat_id(s["labels"]).tolist() == [a["category_id"] for a in anns]


def test_crowd_degenerate_and_clipping(make_coco):
    ann, images = make_coco(
        images=[(64, 48), (64, 48)],
        annotations=[
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},  # kept
            {"image_id": 1, "category_id": 1, "bbox": [50, 40, 30, 30]},  # clipped to (50, 40, 64, 48)
            {"image_id": 1, "category_id": 1, "bbox": [5, 5, 30, 30], "iscrowd": 1},  # crowd: not trained
            {"image_id": 1, "category_id": 1, "bbox": [30, 30, 0.5, 10]},  # degenerate
            {"image_id": 1, "category_id": 1, "bbox": [70, 10, 10, 10]},  # outside -> degenerate
            {"image_id": 2, "category_id": 1, "bbox": [1, 1, 0, 0]},  # degenerate: image 2 is empty
        ],
    )
    with pytest.warns(DataWarning) as record:
        ds = CocoDetection(ann, images)
    messages = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    assert len(messages) == 1  # one summary, not one per box
    assert "dropped 3 degenerate box" in messages[0] and "4, 5, 6" in messages[0]
    assert ds.num_crowd == 1 and ds.num_degenerate == 3
    assert len(ds) == 2
    assert ds[0]["boxes"].tolist() == [[10, 10, 30, 30], [50, 40, 64, 48]]
    assert ds[1]["boxes"].shape == (0, 4) and ds[1]["labels"].shape == (0,)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        filtered = CocoDetection(ann, images, filter_empty=True)
    assert filtered.image_ids == [1]


def test_label_map_mismatch_is_an_error(synth_coco):
    with pytest.raises(DataError, match="differ from the label map"):
        CocoDetection(synth_coco.train_ann, synth_coco.images, label_map=LabelMap([1, 2], ["a", "b"]))


def test_image_folder_dataset(synth_coco):
    ds = ImageFolderDataset(synth_coco.images)
    assert len(ds) == 16
    s = ds[3]
    assert s["image_id"] == 3 and s["file_name"] == "synth_000004.jpg"
    assert s["boxes"].shape == (0, 4) and s["labels"].shape == (0,)
    batch = collate_detection([ds[0], ds[1]])
    assert batch["boxes"].shape == (2, 0, 4) and batch["labels"].shape == (2, 0)
    assert batch["image_ids"].tolist() == [0, 1]


# ----------------------------------------------------------------------------- bad input


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DataError) as e:
        load_coco(path)
    assert str(path) in str(e.value) and "line 3, column 19" in str(e.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        load_coco(tmp_path / "nope.json")


def test_annotation_with_missing_image_id(make_coco):
    ann, images = make_coco(annotations=[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                                         {"image_id": 42, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    with pytest.raises(DataError, match=r"annotations referring to an image id that is not in 'images' \(1\): annotation 2 \(image id 42\)"):
        CocoDetection(ann, images)


def test_unknown_category_id(make_coco):
    ann, images = make_coco(annotations=[{"image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]}])
    with pytest.raises(DataError, match=r"not in 'categories' \(1\): annotation 1 \(category id 9\)"):
        CocoDetection(ann, images)


def test_invalid_bbox(make_coco):
    ann, images = make_coco(annotations=[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5]}])
    with pytest.raises(DataError, match=r"annotation 1 \(image 1, img_1.jpg\): bbox \[1, 1, 5\] is not a list of 4 numbers"):
        CocoDetection(ann, images)


def test_missing_image_names_path_and_id(make_coco):
    ann, images = make_coco(images=[(32, 32), (32, 32)])
    (images / "img_2.jpg").unlink()
    ds = CocoDetection(ann, images)
    ds[0]
    with pytest.raises(DataError) as e:
        ds[1]
    assert str(images / "img_2.jpg") in str(e.value) and "image id 2" in str(e.value)
    assert "file not found" in str(e.value)


def test_corrupt_image(make_coco):
    ann, images = make_coco()
    (images / "img_1.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match=r"img_1\.jpg \(image id 1\): not a decodable image"):
        CocoDetection(ann, images)[0]


def test_size_mismatch_with_json(make_coco):
    ann, images = make_coco(images=[(40, 30)])
    data = json.loads(ann.read_text())
    data["images"][0]["width"] = 50
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"is 40x30 \(w x h\) on disk but 50x30"):
        CocoDetection(ann, images)[0]


def _assert_one_line_missing_image(message, images):
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"cannot read image {images / 'img_1.jpg'} (image id 1): file not found")
    assert message.endswith("[DataLoader worker process 0]")


def test_worker_error_is_one_readable_line(make_coco):
    """What a DataLoader does with a worker's exception: wrap it, re-raise it in the main process."""
    ann, images = make_coco(images=[(32, 32)])
    (images / "img_1.jpg").unlink()
    ds = CocoDetection(ann, images)
    try:
        ds[0]
    except DataError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as e:
        wrapper.reraise()
    _assert_one_line_missing_image(str(e.value), images)


@pytest.mark.slow  # starts a worker process
def test_worker_error_from_real_dataloader(make_coco):
    ann, images = make_coco(images=[(32, 32)])
    (images / "img_1.jpg").unlink()
    error = first_batch_error(DataLoader(CocoDetection(ann, images), batch_size=1, num_workers=1,
                                         collate_fn=collate_detection))
    assert isinstance(error, DataError)
    message = str(error)
    _assert_one_line_missing_image(message, images)


# ----------------------------------------------------------------------------- decoding at reduced size
def test_decode_reduction_follows_the_leading_resize():
    import albumentations as A

    from focaldet.data.transforms import build_transforms, decode_reduction
    photo = (3024, 4032)  # h, w
    assert decode_reduction(build_transforms(False, min_size=800, max_size=1333), *photo) == 2  # scale 0.26
    assert decode_reduction(build_transforms(True, min_size=[640, 800], max_size=1333), *photo) == 2  # largest
    assert decode_reduction(build_transforms(False, min_size=256, max_size=512), *photo) == 8  # scale 0.085
    assert decode_reduction(build_transforms(False, min_size=800, max_size=1333), 480, 640) == 1  # upscaled
    assert decode_reduction(None, *photo) == 1
    flip_first = A.Compose([A.HorizontalFlip(p=0.5), ResizeShortestEdge(256, 512)])
    assert decode_reduction(flip_first, *photo) == 1  # only a leading resize is understood
    assert decode_reduction(A.Compose([ResizeShortestEdge(256, 512, p=0.5)]), *photo) == 1
    assert decode_reduction(A.Compose([ResizeShortestEdge(256, 512)], p=0.5), *photo) == 1  # may not run at all


def _reduced_and_full_samples(dataset, monkeypatch):
    """``(reduced, full, reads)``: every sample as ``dataset`` reads it, then with every image
    decoded in full, and the ``reduce`` of each decode (a file's or its bytes'), in order."""
    from focaldet.data import coco as coco_module
    reads = []
    read_image, image_from_bytes = coco_module.read_image, coco_module.image_from_bytes

    def counting_read(path, image_id=None, reduce=1):
        reads.append(reduce)
        return read_image(path, image_id, reduce)

    def counting_decode(buffer, what, reduce=1, max_pixels=coco_module.MAX_PIXELS):
        reads.append(reduce)
        return image_from_bytes(buffer, what, reduce, max_pixels)

    monkeypatch.setattr(coco_module, "read_image", counting_read)
    monkeypatch.setattr(coco_module, "image_from_bytes", counting_decode)
    reduced = [dataset[i] for i in range(len(dataset))]
    monkeypatch.setattr(coco_module, "decode_reduction", lambda *a: 1)
    full = [dataset[i] for i in range(len(dataset))]
    return reduced, full, reads


@pytest.mark.filterwarnings("ignore:.*degenerate box")  # squashing the images clips a few boxes away
def test_reduced_decode_gives_the_same_sample(tmp_path, monkeypatch):
    """A 1600x1200 photo evaluated at 256 px is decoded at 1/4: the same image size and boxes
    (to rounding), nearly the same pixels, as a full decode resized."""
    import cv2

    from focaldet.data.transforms import build_transforms
    synth = write_synthetic_coco(tmp_path, num_images=3, seed=1, image_size=1600, val_fraction=0.34)
    for path in synth.images.glob("*.jpg"):  # 1600x1200: not square, not a multiple of 8 high
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (1600, 1203)))
    data = json.loads(synth.train_ann.read_text())
    for img in data["images"]:
        img["height"] = 1203
    synth.train_ann.write_text(json.dumps(data))
    eval_transforms = build_transforms(False, min_size=256, max_size=512)
    dataset = CocoDetection(synth.train_ann, synth.images, transforms=eval_transforms)
    reduced, full, reads = _reduced_and_full_samples(dataset, monkeypatch)
    for a, b in zip(reduced, full):
        assert a["size"] == b["size"] == (256, 340) and len(a["boxes"]) == len(b["boxes"]) > 0
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=0.5, rtol=0)  # input pixels at 256 px
        assert (a["image"].float() - b["image"].float()).abs().mean() < 2.5  # gray levels (measured: 1.3-1.4)
    assert reads == [4] * len(dataset) + [1] * len(dataset)


def test_image_folder_decodes_large_jpegs_smaller(tmp_path, monkeypatch):
    """A 1600x1203 JPEG, the same photo turned by EXIF (orientation 6) and as PNG, predicted at
    256 px: the JPEGs decode at 1/4 with the full size as ``orig_size``, the same sample size
    and nearly the same pixels as a full decode; the PNG decodes in full."""
    import numpy as np
    from PIL import Image

    from focaldet.data import coco as coco_module
    from focaldet.data.transforms import build_transforms
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8), np.ones((160, 160, 1), np.uint8))
    photo = Image.fromarray(blocks[:1203])  # 1600 x 1203, in 160 px squares: smooth enough to compare
    photo.save(tmp_path / "a.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees: 1203 x 1600
    photo.save(tmp_path / "b.jpg", quality=95, exif=exif)
    photo.save(tmp_path / "c.png")
    headers = [coco_module.read_header(tmp_path / name) for name in ("a.jpg", "b.jpg", "c.png")]
    assert [(h.format, h.size, h.stored_size, h.orientation) for h in headers] == [
        ("JPEG", (1203, 1600), (1203, 1600), 1), ("JPEG", (1600, 1203), (1203, 1600), 6),
        ("PNG", (1203, 1600), (1203, 1600), 1)]
    dataset = ImageFolderDataset(tmp_path, transforms=build_transforms(False, min_size=256, max_size=512))
    reduced, full, reads = _reduced_and_full_samples(dataset, monkeypatch)
    assert reads == [4, 4, 1, 1, 1, 1]
    wide, turned = ((256, 340), (1203, 1600)), ((340, 256), (1600, 1203))  # (size, orig_size)
    for a, b, (size, orig_size) in zip(reduced, full, [wide, turned, wide]):
        assert a["size"] == b["size"] == size
        assert a["orig_size"] == b["orig_size"] == orig_size
        assert (a["image"].float() - b["image"].float()).abs().mean() < 1.0  # gray levels (measured: 0.08)
    monkeypatch.undo()  # decode_reduction and read_image as they are
    lie = coco_module.read_header(tmp_path / "a.jpg").__class__("JPEG", "RGB", (2400, 3200), (2400, 3200))
    monkeypatch.setattr(coco_module, "read_header", lambda path: lie)  # a header that lies
    assert dataset[0]["orig_size"] == (1203, 1600)  # the pixels win: decoded again in full


def test_size_mismatch_at_reduced_decode_names_the_size_on_disk(make_coco):
    from focaldet.data.transforms import build_transforms
    ann, images = make_coco(images=[(1600, 1200)])
    data = json.loads(ann.read_text())
    data["images"][0]["width"] = 1640  # still decodes at 1/4 for 256 px: 410 vs 400 columns
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"is 1600x1200 \(w x h\) on disk but 1640x1200"):
        CocoDetection(ann, images, transforms=build_transforms(False, min_size=256, max_size=512))[0]
