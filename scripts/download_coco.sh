#!/usr/bin/env bash
# Fetch COCO 2017 (train/val images + instances annotations) into data/coco, laid out as
# configs/retinanet_r50_fpn_1x_coco.yaml expects. Needs ~20 GB and an internet connection;
# never run by the tests.
set -euo pipefail
dest=${1:-data/coco}
mkdir -p "$dest"
cd "$dest"
base=http://images.cocodataset.org
for f in zips/train2017.zip zips/val2017.zip annotations/annotations_trainval2017.zip; do
  [ -f "$(basename $f)" ] || curl -fL -O "$base/$f"
  unzip -q -n "$(basename $f)"
done
echo "COCO 2017 ready in $(pwd): train2017/ val2017/ annotations/"
