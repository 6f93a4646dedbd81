"""ONNX export of a trained mLiT classifier: ``mlit export RUN --onnx FILE``.

The graph is the eval forward (no dropout, no gate noise, no auxiliary loss) of the reference MoE
path, with a dynamic batch: input ``images`` float32 (N, 3, 36, 36), normalised as at evaluation
(bilinear resize to 36×36, then pixel / 127.5 − 1); output ``logits`` float32 (N, classes). The
file's metadata (``metadata_props``) names the model, the data set, the class names and this
preprocessing. Ties among gate logits pick the lowest expert index, as in torch (ONNX TopK's
rule), so torch, onnxruntime and the Triton kernels route every token alike.

Needs the ``deploy`` extra: ``pip install -e ".[deploy]"`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .atomic import atomic_write

INPUT_NAME, OUTPUT_NAME = "images", "logits"
PREPROCESSING = ("uint8 RGB image (grey images replicated to 3 channels) at the data set's size, bilinear resize "
                 "to 36x36, rounded, then x / 127.5 - 1; layout NCHW float32")
CHECK_TOLERANCE = 1e-4  # max |logit difference| onnxruntime vs torch accepted by the post-export check


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported file does not reproduce torch."""


class ClassifierLogits(nn.Module):
    """images (N, 3, 36, 36) → logits (N, classes): ``forward_head(forward_features(x))``, eval only."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.forward_head(self.classifier.forward_features(images))


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"{module} is not installed; install the deploy extra: pip install -e \".[deploy]\"") from None


def export_model(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                 opset: int | None = None) -> Path:
    """Write ``model`` (an MLiTClassifier) as ONNX to ``path``, atomically; returns the path.

    The model is exported in eval mode with every MoE layer on the reference backend (its mode
    and backends are restored afterwards)."""
    _require("onnxscript")
    onnx = _require("onnx")
    from mlit_kernels import SharedSwiGLUMoE

    if not hasattr(model, "forward_head"):
        raise ExportError(f"only classifiers can be exported (got {type(model).__name__})")
    layers = [m for m in model.modules() if isinstance(m, SharedSwiGLUMoE)]
    backends, was_training = [m.backend for m in layers], model.training
    embed_backend = model.encoder.backend
    try:
        model.eval()
        model.encoder.backend = "reference"  # the patch embedding in torch ops, as the MoE layers
        for layer in layers:
            layer.backend = "reference"
        image = model.encoder.image
        example = torch.zeros(2, image.in_chans, image.image_size, image.image_size)
        batch = torch.export.Dim("batch", min=1)
        with _quiet():
            program = torch.onnx.export(ClassifierLogits(model).eval(), (example,), None, dynamo=True, external_data=False,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                                        dynamic_shapes={"images": {0: batch}}, verbose=False)
        proto = program.model_proto
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
        model.encoder.backend = embed_backend
        for layer, backend in zip(layers, backends):
            layer.backend = backend
    for key, value in {"mlit.version": __version__, "mlit.preprocessing": PREPROCESSING, **(metadata or {})}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return atomic_write(path, lambda f: f.write(proto.SerializeToString()))


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints, its notes on optional packages (torchvision) and
    deprecation warnings from inside torch.export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def onnx_logits(path: str | os.PathLike, images: torch.Tensor) -> torch.Tensor:
    """Run the exported file with onnxruntime (CPU) on normalised images (N, 3, 36, 36)."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.detach().float().cpu().numpy()})
    return torch.from_numpy(out)


def export_onnx(run: str | os.PathLike, path: str | os.PathLike, opset: int | None = None, check: bool = True) -> str:
    """Export the classifier of a run (dir, checkpoint.pt or model.safetensors) to ``path``.

    check: run the file with onnxruntime on 8 random images (and one alone) and compare with
    torch (max |logit difference| must be ≤ CHECK_TOLERANCE, top-1 equal). Returns a report."""
    from .data.datasets import CLASS_NAMES
    from .registry import load_model, model_name

    model, meta = load_model(run, backend="reference")
    if meta["task"] == "pretrain":
        raise ExportError(f"{run} is a pre-training (MAE) run; export a classifier (a train or finetune run)")
    dataset = (meta.get("recipe") or {}).get("dataset")
    name = model_name(meta["model_config"], meta["task"])
    metadata = {"mlit.model": name, "mlit.dataset": str(dataset), "mlit.source": str(run),
                "mlit.classes": json.dumps(list(CLASS_NAMES.get(dataset, range(model.num_classes))))}
    out = export_model(model, path, metadata, opset)
    lines = [f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {name}, {model.num_classes} classes"
             f"{f' of {dataset}' if dataset else ''}; input {INPUT_NAME} float32 (N, 3, 36, 36), output "
             f"{OUTPUT_NAME} (N, {model.num_classes})"]
    if check:
        g = torch.Generator().manual_seed(0)
        images = torch.rand(8, 3, 36, 36, generator=g) * 2 - 1
        with torch.no_grad():
            expected = ClassifierLogits(model)(images)
        got = torch.cat([onnx_logits(out, images[:1]), onnx_logits(out, images[1:])])
        err = (got - expected).abs().max().item()
        if err > CHECK_TOLERANCE or not torch.equal(got.argmax(1), expected.argmax(1)):
            out.unlink()
            raise ExportError(f"the exported graph disagrees with torch (max |logit difference| {err:.3g} > "
                              f"{CHECK_TOLERANCE}); the file was removed")
        lines.append(f"check: onnxruntime vs torch on 9 random images: max |logit difference| {err:.2g}, "
                     f"top-1 equal")
    return "\n".join(lines)
