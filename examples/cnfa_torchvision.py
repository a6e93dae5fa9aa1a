"""CNFA of a torchvision ImageNet model: pre-trained weights against a random initialisation.

Run:  pip install -e ".[vision]"
      python examples/cnfa_torchvision.py --model alexnet [--images DIR] [--n 32]

Downloads the pre-trained weights (torchvision's cache) when run. Images: every JPEG/PNG in
``--images``, or by default random 224 x 224 crops of the two photographs bundled with
scikit-learn (``sklearn.datasets.load_sample_images``). Writes cnfa_<model>.parquet and .png.
"""

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from sklearn.datasets import load_sample_images

from ray_convrfm.cnfa.measure import measure_cnfa, to_table
from ray_convrfm.tools.viz import plot_cnfa


def sample_crops(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # two (427, 640, 3) uint8 photographs
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        r = rng.integers(0, img.shape[0] - 224 + 1)
        c = rng.integers(0, img.shape[1] - 224 + 1)
        crops.append(img[r : r + 224, c : c + 224])
    return crops


def load_folder(directory: Path, n: int) -> list[np.ndarray]:
    from PIL import Image

    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [np.asarray(Image.open(p).convert("RGB")) for p in files[:n]]


def main() -> None:
    import torchvision
    from PIL import Image

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="alexnet", choices=["alexnet", "vgg11", "resnet18"])
    p.add_argument("--images", type=Path, default=None)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--class-chunk", type=int, default=50)
    args = p.parse_args()

    weights = torchvision.models.get_model_weights(args.model).DEFAULT
    trained = torchvision.models.get_model(args.model, weights=weights).eval()
    torch.manual_seed(0)
    initial = torchvision.models.get_model(args.model, weights=None).eval()
    arrays = load_folder(args.images, args.n) if args.images else sample_crops(args.n)
    preprocess = weights.transforms()
    images = torch.stack([preprocess(Image.fromarray(a)) for a in arrays])
    rows = measure_cnfa(trained, images, initial_model=initial, class_chunk=args.class_chunk,
                        batch_size=8)
    for r in rows:
        print(f"{r.layer:<22} d={r.d:<5} trained ^1/2 {r.corr_power_half:.3f}  "
              f"initial ^1/2 {r.init_corr_power_half:.3f}")
    pq.write_table(to_table(rows), f"cnfa_{args.model}.parquet")
    plot_cnfa(rows, f"cnfa_{args.model}.png", title=f"CNFA, {args.model} (ImageNet weights)")


if __name__ == "__main__":
    main()
