"""From a trained run to deployment: `mlit export` (ONNX, checked with onnxruntime on real test
images), tie-breaking in the gate alike in torch, ONNX and Triton, and `mlit predict`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from shared_data import fashion_mnist

import mlit
from mlit.cli import main
from mlit.data import GPUAugment, load_split

pytest.importorskip("onnxruntime", reason="the deploy extra is not installed: pip install -e '.[deploy]'")
pytest.importorskip("onnxscript", reason="the deploy extra is not installed: pip install -e '.[deploy]'")

from mlit.export import ClassifierLogits, export_model, onnx_logits  # noqa: E402

# What "agrees" means for the exported graph: the same top-1 on every image, and logits within
# this absolute error (float32; measured about 1e-6 on these images).
MAX_ABS_ERR = 1e-4
N_IMAGES = 256


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(data dir, verify, cache) of Fashion-MNIST: Debian's real files, else generated official-format ones."""
    folder, verify = fashion_mnist()
    return folder, verify, tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def test_images(data):
    """The first 256 Fashion-MNIST test images, uint8 (N, 3, 28, 28), and their labels."""
    folder, verify, cache = data
    split = load_split("fashion_mnist", "test", data_dir=folder, cache_dir=cache, verify=verify)
    return split.images[:N_IMAGES], split.labels[:N_IMAGES]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A short mLiT-XXS run on Fashion-MNIST, stopped by --max-steps after 4 optimizer steps (the
    gate weights have left zero), with a --save-every checkpoint on the way."""
    folder, verify, cache = data
    out = tmp_path_factory.mktemp("runs") / "fm"
    argv = ["train", "--data-dir", str(folder), "--cache-dir", str(cache), "--max-steps", "4", "--save-every", "2",
            "--limit-train", "64", "--batch-size", "16", "--limit-test", "16", "--lr", "1e-3", "--warmup-epochs", "0",
            "--no-augment", "--no-progress", "--device", "cpu", "--out", str(out)] + ([] if verify else ["--no-verify"])
    assert main(argv) == 0
    assert (out / "model.safetensors").is_file()
    return out


def _normalised(images: torch.Tensor) -> torch.Tensor:
    return GPUAugment(train=False)(images)


def _assert_agree(onnx_file, model, images):
    x = _normalised(images)
    with torch.no_grad():
        expected = ClassifierLogits(model.eval())(x)
    got = onnx_logits(onnx_file, x)
    assert got.shape == expected.shape
    disagree = (got.argmax(1) != expected.argmax(1)).nonzero().flatten().tolist()
    assert not disagree, f"top-1 differs on images {disagree}"
    err = (got - expected).abs().max().item()
    assert err <= MAX_ABS_ERR, err
    return err


def test_export_agrees_with_torch_on_real_test_images(run, test_images, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    file = tmp_path / "fm.onnx"
    assert main(["export", str(run), "--onnx", str(file)]) == 0
    report = capsys.readouterr().out
    assert "max |logit difference|" in report and "top-1 equal" in report
    model = mlit.create_model("mlit_xxs", checkpoint=run, backend="reference")
    images, _ = test_images
    _assert_agree(file, model, images)
    _assert_agree(file, model, images[:1])  # the batch dimension is dynamic
    meta = {p.key: p.value for p in onnx.load(str(file)).metadata_props}
    assert meta["mlit.model"] == "mlit_xxs" and meta["mlit.dataset"] == "fashion_mnist"
    assert json.loads(meta["mlit.classes"])[9] == "Ankle boot" and "127.5" in meta["mlit.preprocessing"]


def test_untrained_model_where_every_token_ties(test_images, tmp_path):
    """At init W_g = 0: every gate logit of every token ties. torch and ONNX must pick the same
    experts (the lowest indices), so the logits agree."""
    torch.manual_seed(0)
    model = mlit.create_model("mlit_xxs", num_classes=10, backend="reference")
    gates = [m.w_gate for m in model.modules() if hasattr(m, "w_gate")]
    assert all(not g.any() for g in gates)
    file = export_model(model, tmp_path / "init.onnx")
    images, _ = test_images
    _assert_agree(file, model, images)


def test_lowest_index_rule_in_onnx(tmp_path):
    """The tie rule itself through the exporter: lowest index wins, NaN counts as -inf."""
    from mlit_kernels.reference import top_k_lowest_index

    class TopK(torch.nn.Module):
        def forward(self, h):
            return top_k_lowest_index(h, 2)

    h = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 0.5, 2.0], [float("nan"), 0.0, float("nan"), 0.0, -1.0],
                      [3.0, float("nan"), 3.0, 1.0, 3.0], [-1.0, -1.0, -2.0, -1.0, -3.0]])
    values, indices = TopK()(h)
    assert indices.tolist() == [[0, 1], [1, 2], [1, 3], [0, 2], [0, 1]]
    import onnxruntime as ort

    file = tmp_path / "topk.onnx"
    torch.onnx.export(TopK().eval(), (h,), str(file), dynamo=True, input_names=["h"], output_names=["values", "indices"],
                      dynamic_shapes={"h": {0: torch.export.Dim("n", min=1)}})
    got_values, got_indices = ort.InferenceSession(str(file)).run(None, {"h": h.numpy()})
    assert got_indices.tolist() == indices.tolist()
    np.testing.assert_array_equal(got_values, values.numpy())


@pytest.mark.slow
def test_triton_picks_the_same_experts_at_init():
    """The Triton kernels (here through Triton's interpreter) route tied tokens as the reference does."""
    torch.manual_seed(0)
    model = mlit.create_model("mlit_xxs", num_classes=10, backend="reference").eval()
    x = torch.rand(1, 3, 36, 36) * 2 - 1
    with torch.no_grad():
        expected = model(x)[0]
        model.set_backend("triton")
        got = model(x)[0]
    torch.testing.assert_close(got, expected, atol=MAX_ABS_ERR, rtol=0)


def test_export_errors(tmp_path, run):
    with pytest.raises(SystemExit, match="mlit export: error: .*does not exist"):
        main(["export", str(tmp_path / "missing"), "--onnx", str(tmp_path / "x.onnx")])
    from mlit.models import MMLiT
    from mlit.train.checkpoint import save_safetensors
    import dataclasses

    mae = MMLiT(mlit.registry.ENCODERS["XXS"])
    save_safetensors(mae, tmp_path / "pre" / "model.safetensors",
                     {"task": "pretrain", "model_config": dataclasses.asdict(mae.encoder.cfg), "num_classes": None,
                      "recipe": {"dataset": "cifar100"}})
    with pytest.raises(SystemExit, match="pre-training .* export a classifier"):
        main(["export", str(tmp_path / "pre"), "--onnx", str(tmp_path / "x.onnx")])
    with pytest.raises(SystemExit, match="pre-training .* predict needs a classifier"):
        main(["predict", str(tmp_path / "pre"), str(tmp_path / "x.png")])


# --- predict ----------------------------------------------------------------------------------


def _model_probabilities(run, images):
    model = mlit.create_model("mlit_xxs", checkpoint=run, backend="reference").eval()
    with torch.no_grad():
        return model(_normalised(images))[0].softmax(-1)


def test_predict_png_and_npy_apply_the_evaluation_preprocessing(run, test_images, tmp_path, capsys):
    from PIL import Image

    from mlit.data.datasets import CLASS_NAMES

    images, _ = test_images
    grey = images[:3, 0].numpy()  # (3, 28, 28): Fashion-MNIST is grey, stored replicated
    Image.fromarray(grey[0]).save(tmp_path / "a.png")
    Image.fromarray(np.stack([grey[1]] * 3, -1)).save(tmp_path / "b.jpg", quality=100)  # an RGB JPEG
    np.save(tmp_path / "batch.npy", grey)
    assert main(["predict", str(run), str(tmp_path / "a.png"), str(tmp_path / "batch.npy"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["source"] for p in out] == [str(tmp_path / "a.png")] + [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(3)]
    expected = _model_probabilities(run, images[:3])
    names = CLASS_NAMES["fashion_mnist"]
    for pred, probs in zip(out, torch.cat([expected[:1], expected])):
        assert len(pred["top"]) == 5
        top = probs.topk(5)
        assert [t["class"] for t in pred["top"]] == [names[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([t["probability"] for t in pred["top"]], top.values.numpy(), rtol=1e-5, atol=1e-6)
    # a colour JPEG of another size: converted to grey and resized to 28x28 first; the table form
    Image.fromarray(np.stack([grey[1]] * 3, -1)).resize((56, 56)).save(tmp_path / "big.jpg")
    assert main(["predict", str(run), str(tmp_path / "big.jpg"), str(tmp_path / "b.jpg"), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / "big.jpg") and len(lines) == 8 and lines[1].strip().endswith(tuple(names))


@pytest.mark.parametrize("content, message", [
    (b"not an image", "not a readable image"),
    (None, "does not exist"),
])
def test_predict_unreadable_files(run, tmp_path, content, message):
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit, match=f"mlit predict: error: {path}.*{message}"):
        main(["predict", str(run), str(path)])


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 28, 28), np.float32), "dtype float32; expected uint8"),
    (np.zeros((2, 5, 28, 28), np.uint8), r"shape \(2, 5, 28, 28\) is not an image or batch"),
    (np.zeros((0, 28, 28), np.uint8), "is not an image or batch"),
])
def test_predict_bad_arrays(run, tmp_path, array, message):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(SystemExit, match=message):
        main(["predict", str(run), str(tmp_path / "x.npy")])
    (tmp_path / "y.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(SystemExit, match="not a readable .npy array"):
        main(["predict", str(run), str(tmp_path / "y.npy")])
