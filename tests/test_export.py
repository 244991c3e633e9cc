"""Export: the fixed-shape detection path, ONNX (onnxruntime) and torch.export files
against the PyTorch model, their mAP, metadata and bad input.

The model is the session's tiny run (tests/conftest.py `tiny_run`: ResNet-18, FPN 32, one head
conv, 40 steps on the synthetic set, detections kept down to score 0.02) and its one ONNX file
(`tiny_onnx`), shared with the doors test.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from focaldet.data import CocoDataModule, read_image
from focaldet.export import ExportableDetector, ExportedDetector, ExportError
from focaldet.export.cli import main as export_main
from focaldet.modeling import BoxCoder, PostProcess

SIZE = 128  # the synthetic images' side


# ----------------------------------------------------------------------------- the two paths
@pytest.mark.parametrize("n,r,k,bias", [(3, 700, 5, -1.5), (2, 3000, 3, -3.0), (1, 40, 2, -8.0)])
def test_padded_path_gives_the_fast_paths_detections(n, r, k, bias):
    """PostProcess.padded (export) and PostProcess.__call__ (training-time evaluation): the
    same detections per image, in the same order; few, many and no candidates."""
    g = torch.Generator().manual_seed(r)
    post, coder = PostProcess(detections_per_img=50), BoxCoder()
    levels = [r, r // 4]
    logits = [torch.randn(n, m, k, generator=g) + bias for m in levels]
    deltas = [torch.randn(n, m, 4, generator=g) * 0.2 for m in levels]
    anchors = []
    for m in levels:
        xy = torch.rand(m, 2, generator=g) * 200
        anchors.append(torch.cat([xy, xy + 8 + torch.rand(m, 2, generator=g) * 60], 1))
    sizes = torch.tensor([[240, 260]] * n)
    fast = post(logits, deltas, anchors, sizes, coder, score_fn=torch.sigmoid)
    padded = post.padded(logits, deltas, anchors, sizes, coder, score_fn=torch.sigmoid)
    assert padded["boxes"].shape == (n, 50, 4) and padded["scores"].shape == (n, 50)
    for i, det in enumerate(fast):
        m = int(padded["num_detections"][i])
        assert m == len(det["scores"])
        torch.testing.assert_close(padded["scores"][i, :m], det["scores"], rtol=0, atol=0)
        torch.testing.assert_close(padded["boxes"][i, :m], det["boxes"], rtol=0, atol=0)
        assert torch.equal(padded["labels"][i, :m], det["labels"])
        assert (padded["scores"][i, m:] == 0).all() and (padded["labels"][i, m:] == -1).all()
        assert (padded["boxes"][i, m:] == 0).all()
    if bias == -8.0:
        assert int(padded["num_detections"].sum()) == 0


# ----------------------------------------------------------------------------- a small trained model
@pytest.fixture(scope="module")
def trained(tiny_run, synth_coco, tmp_path_factory):
    """``(module, datamodule, folder)``: the session's tiny run (ResNet-18, FPN 32, one head
    conv, 40 AdamW steps, eval size 96/128, detections down to score 0.02) rebuilt from its
    checkpoint as every door does, and a data module at its eval size."""
    from focaldet.api import build_module, read_checkpoint

    contents = read_checkpoint(tiny_run["ckpt"])
    module = build_module(contents)
    dm = CocoDataModule(train_ann=str(synth_coco.train_ann), train_images=str(synth_coco.images),
                        val_ann=str(synth_coco.val_ann), val_images=str(synth_coco.images), batch_size=2,
                        num_workers=0, min_size=contents.inputs.min_size, max_size=contents.inputs.max_size)
    dm.setup("fit")
    module.model.eval()
    return module, dm, tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def onnx_file(tiny_onnx):
    """The session's one ONNX file (`tiny_onnx`: ``focaldet export`` of `tiny_run`)."""
    assert tiny_onnx["status"] == 0
    return tiny_onnx["path"]


def _images(bccd_root, synth_dm, count=3) -> list[np.ndarray]:
    """RGB uint8 images: the synthetic val images, and BCCD val images when present."""
    ds = synth_dm.datasets["val"] if "val" in synth_dm.datasets else None
    paths = [ds.image_dir / r["file_name"] for r in ds.records[:count]]
    if bccd_root is not None:
        bccd = json.loads((bccd_root / "annotations" / "instances_val.json").read_text())
        paths += [bccd_root / "images" / im["file_name"] for im in bccd["images"][:count]]
    return [read_image(p) for p in paths]


def _assert_same_top_detections(got, ref, category_ids, top=20):
    """The top ``top`` reference detections and the exported ones pair up: same category,
    box within 0.5 px, score within 1e-3."""
    cats = torch.tensor(category_ids)[ref["labels"]]
    assert abs(len(got["scores"]) - len(ref["scores"])) <= 1  # one may sit at the threshold
    for a, b in ((ref, got), (got, ref)):
        a_cats = cats if a is ref else a["category_ids"]
        b_cats = cats if b is ref else b["category_ids"]
        for j in range(min(top, len(a["scores"]))):
            close = ((b["scores"] - a["scores"][j]).abs() <= 1e-3) & (b_cats == a_cats[j]) \
                & ((b["boxes"] - a["boxes"][j]).abs().amax(1) <= 0.5)
            assert close.any(), f"detection {j} ({a_cats[j]}, {a['scores'][j]:.4f}, {a['boxes'][j]}) unmatched"


@pytest.fixture(scope="module")
def bccd_or_none():
    from tests.conftest import BCCD_DIR

    return BCCD_DIR if (BCCD_DIR / "annotations" / "instances_val.json").is_file() else None


@pytest.mark.slow
def test_onnx_matches_predict_on_real_and_synthetic_images(trained, onnx_file, bccd_or_none):
    """onnxruntime against RetinaNet.predict, image by image: synthetic 128 px and, when
    present, BCCD 640x480 photos (resized to 96x128 by both)."""
    module, dm, _ = trained
    onnx = ExportedDetector(onnx_file)
    images = _images(bccd_or_none, dm)
    for image in images:
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        ref = module.model.predict([x])[0]
        got = onnx.predict_image(image)
        assert len(ref["scores"]) > 10
        _assert_same_top_detections(got, ref, dm.label_map.cat_ids)


@pytest.mark.slow
def test_onnx_batches_of_any_size_and_shape(trained, onnx_file):
    """N, H and W are dynamic: a batch of 3 images of 150x100 px (a shape not traced, an
    odd resize) gives the eager graph's outputs."""
    module, dm, _ = trained
    graph = ExportableDetector(module.model, dm.label_map.cat_ids).eval()
    x = torch.rand(3, 3, 150, 100, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = graph(x)
    got = ExportedDetector(onnx_file).run(x)
    assert got[0].shape == (3, module.model.postprocess.detections_per_img, 4) and got[2].dtype == np.int64 and got[3].dtype == np.int64
    assert set(np.unique(got[2])) <= set(dm.label_map.cat_ids) | {-1}
    _assert_same_outputs(got, ref)


def _assert_same_outputs(got, ref):
    """Raw outputs ``(boxes, scores, labels, num)`` hold the same detections per image (equal
    scores may come in another order: the exported top-k runs in two stages on every level)."""
    for i in range(len(ref[3])):
        k = int(ref[3][i])
        assert abs(int(got[3][i]) - k) <= 1
        a = {"boxes": torch.as_tensor(got[0][i, :got[3][i]]), "scores": torch.as_tensor(got[1][i, :got[3][i]]),
             "category_ids": torch.as_tensor(got[2][i, :got[3][i]])}
        b = {"boxes": ref[0][i, :k], "scores": ref[1][i, :k], "category_ids": ref[2][i, :k]}
        for x, y in ((a, b), (b, a)):
            for j in range(min(20, len(x["scores"]))):
                close = ((y["scores"] - x["scores"][j]).abs() <= 1e-3) & (y["category_ids"] == x["category_ids"][j]) \
                    & ((y["boxes"] - x["boxes"][j]).abs().amax(1) <= 0.5)
                assert close.any(), (i, j)


@pytest.mark.slow
def test_onnx_map_equals_validate(trained, onnx_file, tmp_path):
    """COCO mAP of the ONNX file through onnxruntime (export evaluate) within 0.002 of
    ``trainer.validate``'s, on ground truth where the model scores well: its own confident
    detections on the val images (so the number is sensitive to every box and score)."""
    import lightning as L

    from focaldet.export.evaluate import evaluate_exported

    module, dm, root = trained
    val = dm.datasets["val"]
    gt = json.loads(val.ann_file.read_text())
    gt["annotations"] = []
    for rec in val.records:
        x = torch.from_numpy(read_image(val.image_dir / rec["file_name"])).permute(2, 0, 1).float() / 255
        det = module.model.predict([x])[0]
        for box, label in zip(det["boxes"][:8].tolist(), det["labels"][:8].tolist()):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": rec["image_id"],
                                      "category_id": dm.label_map.cat_ids[label], "iscrowd": 0,
                                      "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                      "area": (box[2] - box[0]) * (box[3] - box[1])})
    ann = tmp_path / "pseudo_val.json"
    ann.write_text(json.dumps(gt))
    vdm = CocoDataModule(val_ann=str(ann), val_images=str(val.image_dir), batch_size=2, num_workers=0,
                         min_size=dm.inputs.min_size, max_size=dm.inputs.max_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=str(tmp_path)).validate(module, vdm, verbose=False)
    validate_map = module.last_eval.stats["mAP"]
    exported_map = evaluate_exported(onnx_file, ann, val.image_dir).stats["mAP"]
    assert 0.2 < validate_map < 0.95  # far from 0 and 1, so that boxes and scores move it (measured 0.46-0.48)
    assert exported_map == pytest.approx(validate_map, abs=0.002)


@pytest.mark.slow
def test_onnx_metadata(onnx_file, trained):
    import onnx

    _, dm, _ = trained
    meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(meta["category_ids"]) == dm.label_map.cat_ids
    assert json.loads(meta["names"]) == dm.label_map.names
    assert json.loads(meta["min_size"]) == dm.inputs.min_size == 96 and json.loads(meta["size_divisibility"]) == 128
    assert meta["focaldet_version"]
    model = onnx.load(str(onnx_file))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels", "num_detections"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 3 and isinstance(dims[2], str) and isinstance(dims[3], str)


# ----------------------------------------------------------------------------- bad input
def test_unknown_format_and_missing_folder_are_one_line_errors(tmp_path, capsys):
    from focaldet.export import export

    with pytest.raises(ExportError, match="unknown export format 'tflite'; choose from onnx, torch_export"):
        export(None, [1], ["a"], tmp_path / "m.tflite", fmt="tflite")
    with pytest.raises(ExportError, match="output folder .*nope does not exist"):
        export(None, [1], ["a"], tmp_path / "nope" / "m.onnx")
    ckpt = tmp_path / "x.ckpt"
    assert export_main(["--ckpt_path", str(ckpt), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"focaldet export: error: {ckpt}: no such checkpoint"
    assert export_main(["--ckpt_path", str(ckpt), "--format", "coreml", "--output", str(tmp_path / "m")]) == 1
    assert "unknown export format 'coreml'" in capsys.readouterr().err


def test_corrupt_or_foreign_exported_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ExportError, match=r"model.onnx: not a loadable ONNX model"):
        ExportedDetector(bad)
    with pytest.raises(ExportError, match=r"missing.onnx: no such file"):
        ExportedDetector(tmp_path / "missing.onnx")
    pt2 = tmp_path / "model.pt2"
    pt2.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ExportError, match=r"model.pt2: not a torch.export program"):
        ExportedDetector(pt2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exportable_graph_on_cuda_gives_predicts_detections(trained):
    """On CUDA the fast path's NMS is fp64 batched_nms, the padded one fp32 offsets: the
    graph's detections still pair up with predict's."""
    import copy

    module, dm, _ = trained
    model = copy.deepcopy(module.model).cuda()
    graph = ExportableDetector(model, dm.label_map.cat_ids).eval()
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7)).cuda()
    with torch.no_grad():
        boxes, scores, labels, counts = (t.cpu() for t in graph(x))
    for i, ref in enumerate(model.predict(list(x))):
        ref = {k: v.cpu() for k, v in ref.items()}
        got = {"boxes": boxes[i, :counts[i]], "scores": scores[i, :counts[i]], "category_ids": labels[i, :counts[i]]}
        _assert_same_top_detections(got, ref, dm.label_map.cat_ids)


@pytest.mark.slow
def test_export_command_writes_a_program_with_the_graphs_outputs(tiny_run, tiny_pt2, tiny_pt2_detector, synth_coco):
    """``focaldet export --ckpt_path X --format torch_export --output Y.pt2`` on a checkpoint of
    ``focaldet fit`` (the session's `tiny_pt2` of `tiny_run`): the saved program gives the graph's
    outputs at two shapes, and its detections are those of ``focaldet.load(X)``'s model. The
    session's one .pt2 export covers the command and the ``.pt2`` writer; the ``.onnx`` writer
    is tested through ``export_onnx`` above, and the command's format handling by the
    one-line-error test below."""
    import focaldet

    ckpt, out = tiny_run["ckpt"], tiny_pt2["path"]
    assert tiny_pt2["status"] == 0 and f"wrote {out}" in tiny_pt2["stdout"]
    det = focaldet.load(str(ckpt))
    exported = tiny_pt2_detector  # ExportedDetector(out), loaded once for the session
    assert exported.category_ids == list(det.category_ids) and exported.names == list(det.names)
    graph = ExportableDetector(det.model, list(det.category_ids)).eval()
    for shape in ((1, 3, 160, 160), (2, 3, 97, 211)):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            ref = graph(x)
        _assert_same_outputs(exported.run(x), ref)
    image = read_image(next(synth_coco.images.iterdir()))
    ref = det.model.predict([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    got = exported.predict_image(image)
    assert len(ref["scores"]) >= 5  # the run keeps detections down to score 0.02: something to compare
    _assert_same_top_detections(got, ref, list(det.category_ids))


# ----------------------------------------------------------------------------- int8 and OpenVINO
def _matched_fraction(got, ref, category_ids, top=20, min_iou=0.7, score_atol=0.05) -> float:
    """Of the top ``top`` reference detections, the fraction that an exported detection of the
    same category matches with IoU >= ``min_iou`` and a score within ``score_atol``."""
    from torchvision.ops import box_iou

    cats = torch.tensor(category_ids)[ref["labels"]]
    k = min(top, len(ref["scores"]))
    if k == 0:
        return 1.0 if len(got["scores"]) == 0 else 0.0
    iou = box_iou(ref["boxes"][:k], got["boxes"]) if len(got["boxes"]) else torch.zeros(k, 0)
    ok = (iou >= min_iou) & (cats[:k, None] == got["category_ids"][None]) \
        & ((ref["scores"][:k, None] - got["scores"][None]).abs() <= score_atol)
    return float(ok.any(1).float().mean())


@pytest.fixture(scope="module")
def int8_file(trained, onnx_file, bccd_or_none):
    """Calibrated, as a user would, on images like those it is then run on: 8 synthetic
    training images and, when present, 4 BCCD training photos (on which the synthetic-trained
    model's activations run far outside the synthetic images' ranges)."""
    from focaldet.export.formats import quantize_int8

    module, dm, root = trained
    folder = root / "calibration"
    folder.mkdir()
    sources = sorted(dm.datasets["train"].image_dir.glob("*.jpg"))[:8]
    if bccd_or_none is not None:
        sources += sorted((bccd_or_none / "images").glob("*.jpg"))[-4:]
    for i, src in enumerate(sources):
        (folder / f"{i:02d}{src.suffix}").symlink_to(src)
    return quantize_int8(onnx_file, root / "model.int8.onnx", folder, count=len(sources))


@pytest.mark.slow
def test_openvino_matches_predict_like_onnx(trained, onnx_file, bccd_or_none):
    """OpenVINO IR (fp32, converted from the ONNX graph): the same tolerance as ONNX -- the
    top 20 detections pair up with the same category, box within 0.5 px, score within 1e-3."""
    from focaldet.export.formats import export_openvino

    module, dm, root = trained
    xml = export_openvino(onnx_file, root / "model.xml")
    ov = ExportedDetector(xml)
    assert ov.category_ids == dm.label_map.cat_ids and ov.names == dm.label_map.names
    for image in _images(bccd_or_none, dm):
        ref = module.model.predict([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
        _assert_same_top_detections(ov.predict_image(image), ref, dm.label_map.cat_ids)


@pytest.mark.slow
def test_int8_keeps_the_head_in_fp32_and_its_detections_near_predict(trained, int8_file, bccd_or_none):
    """int8 (QDQ convolutions, head outputs fp32): on every image at least 80% of the top 20
    reference detections have an int8 detection of the same category with IoU >= 0.5 and a score
    within 0.05 (measured: all of them, on 3 synthetic and 3 BCCD images). IoU 0.5, not a pixel
    bound: int8 moves boxes by several px (one by 8 px at 128 px); the accuracy that counts is
    the mAP of a trained model (docs/export-formats.md)."""
    import onnx

    module, dm, root = trained
    det = ExportedDetector(int8_file)
    quant = json.loads(det.metadata["quantization"])
    assert quant["fp32_convs"] == ["model.head.bbox_pred.weight", "model.head.cls_logits.weight"]
    ops = {n.op_type for n in onnx.load(str(int8_file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "NonMaxSuppression"} <= ops
    fractions = []
    for image in _images(bccd_or_none, dm):
        ref = module.model.predict([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
        fractions.append(_matched_fraction(det.predict_image(image), ref, dm.label_map.cat_ids, min_iou=0.5))
    print("int8 matched fractions", fractions)
    assert min(fractions) >= 0.8, fractions


def test_quantize_needs_calibration_images_and_onnx(tmp_path, capsys):
    assert export_main(["--ckpt_path", "x.ckpt", "--format", "onnx", "--quantize", "int8",
                        "--output", str(tmp_path / "m.onnx")]) == 1
    assert "--quantize int8 needs --calibration_images DIR" in capsys.readouterr().err
    from focaldet.export.formats import calibration_files

    with pytest.raises(ExportError, match="--calibration_images folder .* does not exist"):
        calibration_files(tmp_path / "nope")
    with pytest.raises(ExportError, match="no images"):
        calibration_files(tmp_path)
