"""Classify image files with a trained run: ``mlit predict RUN IMAGE...``.

Each input is brought to what the model saw at evaluation: decoded to uint8 RGB (grey for
Fashion-MNIST, replicated to three channels), resized with PIL's bilinear filter to the data
set's stored size when it differs (32 for CIFAR/SVHN, 28 for Fashion-MNIST, 36 for Flowers102, as
the Flowers102 decoder does), then the evaluation transform (bilinear resize to 36×36, pixel /
127.5 − 1). Inputs: PNG / JPEG (anything PIL reads), or ``.npy`` uint8 arrays (loaded without
pickle): one image (H, W) or (H, W, C), or a batch (N, H, W), (N, H, W, C), (N, C, H, W); C is
1 or 3.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class PredictError(ValueError):
    """An input that cannot be read or is not an image batch (the message names the file)."""


@dataclass
class Prediction:
    """The top classes of one image: ``source`` (file, or ``file[i]`` for a batch), (name, probability) pairs."""

    source: str
    top: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return {"source": self.source, "top": [{"class": c, "probability": p} for c, p in self.top]}


def _as_nhwc(array: np.ndarray, path: Path) -> np.ndarray:
    """An .npy array as uint8 (N, H, W, C), C in {1, 3}."""
    if array.dtype != np.uint8:
        raise PredictError(f"{path}: dtype {array.dtype}; expected uint8 pixel values 0..255")
    a = array
    if a.ndim == 2:
        a = a[None, :, :, None]
    elif a.ndim == 3:
        a = a[None] if a.shape[-1] in (1, 3) else a[..., None]
    elif a.ndim == 4:
        if a.shape[-1] not in (1, 3) and a.shape[1] in (1, 3):
            a = a.transpose(0, 2, 3, 1)
    if a.ndim != 4 or a.shape[-1] not in (1, 3) or min(a.shape) == 0:
        raise PredictError(f"{path}: shape {array.shape} is not an image or batch: expected (H, W), (H, W, C), "
                           f"(N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3")
    return a


def read_images(paths: list[str | os.PathLike], size: int, grey: bool) -> tuple[torch.Tensor, list[str]]:
    """uint8 images (N, 3, size, size) and a name per image, from image files and .npy batches."""
    from PIL import Image, UnidentifiedImageError

    images, names = [], []

    def add(im: Image.Image, name: str) -> None:
        im = im.convert("L" if grey else "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        images.append(np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a)
        names.append(name)

    for p in map(Path, paths):
        if not p.is_file():
            raise PredictError(f"{p} does not exist" if not p.exists() else f"{p} is not a file")
        if p.suffix.lower() == ".npy":
            try:
                array = np.load(p, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise PredictError(f"{p}: not a readable .npy array ({e})") from None
            for i, a in enumerate(_as_nhwc(array, p)):
                add(Image.fromarray(a[:, :, 0] if a.shape[-1] == 1 else a), f"{p}[{i}]")
        else:
            try:
                with Image.open(p) as im:
                    im.load()
                    add(im, str(p))
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise PredictError(f"{p}: not a readable image ({e}); expected PNG, JPEG or .npy") from None
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), names


def predict_files(run: str | os.PathLike, paths: list[str | os.PathLike], top_k: int = 5, device: str | None = None,
                  backend: str = "auto", batch_size: int = 256) -> list[Prediction]:
    """Top-``top_k`` classes with probabilities for every image in ``paths``, with the model of ``run``."""
    from .data import GPUAugment
    from .data.datasets import CLASS_NAMES, DATASETS, GREY_DATASETS
    from .registry import load_model
    from .train.distributed import default_device

    model, meta = load_model(run, backend=backend)
    if meta["task"] == "pretrain":
        raise PredictError(f"{run} is a pre-training (MAE) run; predict needs a classifier (a train or finetune run)")
    dataset = (meta.get("recipe") or {}).get("dataset")
    if dataset not in DATASETS:
        raise PredictError(f"{run} does not name its data set (recipe.dataset = {dataset!r}); cannot preprocess")
    images, names = read_images(paths, DATASETS[dataset].size, dataset in GREY_DATASETS)
    dev = torch.device(device or default_device())
    model.to(dev)
    transform = GPUAugment(train=False, size=model.encoder.image.image_size)
    classes = CLASS_NAMES[dataset]
    k = min(top_k, len(classes))
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            logits, _ = model(transform(images[s:s + batch_size].to(dev)), need_aux=False)
            probs, idx = logits.float().softmax(-1).topk(k, dim=-1)
            for name, p, i in zip(names[s:s + batch_size], probs.tolist(), idx.tolist()):
                out.append(Prediction(name, [(classes[c], q) for c, q in zip(i, p)]))
    return out


def format_predictions(predictions: list[Prediction]) -> str:
    """One block per image: its name, then one line per class, most probable first."""
    lines = []
    for pred in predictions:
        lines.append(pred.source)
        lines += [f"  {100 * p:6.2f}%  {c}" for c, p in pred.top]
    return "\n".join(lines)
