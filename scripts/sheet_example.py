"""Draw docs/reports_sheet_example.jpg: the detection sheet `validate` writes, on 8 BCCD val
photos cropped to mixed sizes, with STAND-IN detections (the ground truth jittered by a few
pixels, random scores) so the picture needs no trained model.

    python scripts/sheet_example.py ../shared/data/bccd docs/reports_sheet_example.jpg
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from focaldet.visualize import detection_grid

CROPS = [None, (0, 0, 240, 460), (100, 50, 420, 290), None, (0, 0, 180, 180), (200, 0, 640, 200), None,
         (300, 100, 560, 480)]  # (x0, y0, x1, y1) or the whole photo


def main(root: Path, out: Path) -> None:
    data = json.loads((root / "annotations" / "instances_val.json").read_text())
    cats = sorted(data["categories"], key=lambda c: c["id"])
    k_of, names = {c["id"]: k for k, c in enumerate(cats)}, [c["name"] for c in cats]
    gen = torch.Generator().manual_seed(0)
    images, dets, targets = [], [], []
    for info, crop in zip(data["images"], CROPS):
        pixels = np.asarray(Image.open(root / "images" / info["file_name"]).convert("RGB"))
        anns = [a for a in data["annotations"] if a["image_id"] == info["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = torch.tensor([k_of[a["category_id"]] for a in anns])
        if crop:
            x0, y0, x1, y1 = crop
            pixels = pixels[y0:y1, x0:x1]
            boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, x1 - x0)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, y1 - y0)
            keep = ((boxes[:, 2:] - boxes[:, :2]) > 4).all(dim=1)
            boxes, labels = boxes[keep], labels[keep]
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # (H, W, 3) -> (3, H, W)
        targets.append({"boxes": boxes, "labels": labels})
        dets.append({"boxes": boxes + torch.randn(boxes.shape, generator=gen) * 4,
                     "scores": torch.rand(len(boxes), generator=gen) * 0.7 + 0.3, "labels": labels})
    sheet = detection_grid(images, dets, names, score_threshold=[0.41, 0.35, 0.52], targets=targets,
                           max_width=1100, row_height=240)
    Image.fromarray(sheet.permute(1, 2, 0).numpy()).save(out, quality=70)  # (3, H, W) -> (H, W, 3)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
