"""Keep only the backbone of a trained model: the "ImageNet-pretrained ResNet" of a study.

    python scripts/backbone_weights.py CKPT OUT.pth

Reads a focaldet checkpoint (or any file ``--model.init_weights`` reads) and writes the
backbone's tensors alone (``backbone.*``, focaldet's names) as a plain state dict. Given to
``--model.init_weights OUT.pth`` it starts the backbone from those weights and leaves the FPN
and both subnets at their from-scratch initialisation (the prior-probability bias included),
as the paper's RetinaNet starts from an ImageNet-pretrained ResNet. The loss studies of the
docs/studies.md ("Studies on the synthetic set") use it with a backbone trained on synthetic shapes of another seed and class set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from focaldet.modeling.weights import read_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="checkpoint or weights file")
    parser.add_argument("out", type=Path, help="the backbone-only state dict to write (.pth)")
    args = parser.parse_args()
    state = {k: v for k, v in read_source(args.source).items() if k.startswith("backbone.")}
    if not state:
        raise SystemExit(f"{args.source}: no backbone.* tensors found")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"wrote {len(state)} backbone tensors to {args.out}")


if __name__ == "__main__":
    main()
