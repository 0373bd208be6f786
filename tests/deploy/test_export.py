"""The export stage: each format's file computes what the PyTorch model does, keeps the factorized
structure, takes any batch size, and is written quietly and atomically."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from cstar_dsl.deploy import export as export_module
from cstar_dsl.deploy.artifacts import ArtifactError, load
from cstar_dsl.deploy.export import FORMATS, TOLERANCE, Exported, ExportError, export
from tests.helpers import save_model_folder


@pytest.fixture(scope="module")
def factorized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("factorized"), factorized=True)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("dense"), factorized=False)


@pytest.fixture(scope="module")
def onnx_file(factorized: Path) -> Exported:
    return export(factorized, "onnx")


def _ops(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(module, kind) for module in model.modules())


def test_onnx_export_matches_pytorch_at_the_default_opset(onnx_file: Exported, factorized: Path):
    assert onnx_file.path == factorized / "model.onnx"
    assert onnx_file.bytes == onnx_file.path.stat().st_size > 0
    assert onnx_file.max_abs_diff is not None and onnx_file.max_abs_diff <= TOLERANCE
    assert onnx_file.checked_with == f"onnxruntime {onnxruntime.__version__}"
    assert onnx_file.opset == 18 == onnx.load(str(onnx_file.path)).opset_import[0].version
    assert onnx_file.seconds > 0
    onnx.checker.check_model(str(onnx_file.path), full_check=True)


def test_onnx_keeps_the_factorized_layers(onnx_file: Exported, factorized: Path):
    model = load(factorized)
    ops = _ops(onnx_file.path)
    # No folding of a Tucker-2 layer back into one conv: one ONNX Conv per nn.Conv2d, three per
    # factorized layer (compress, core, expand) next to the two dense ones.
    assert ops["Conv"] == _count(model, nn.Conv2d) == 2 + 3 * 2
    # The low-rank Linear stays two matrix products.
    assert ops["Gemm"] + ops["MatMul"] == _count(model, nn.Linear) == 2


def test_the_factorized_onnx_file_is_smaller_than_the_dense_one_and_nothing_is_printed(
        onnx_file: Exported, dense: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    dense_file = export(dense, "onnx", out=tmp_path / "dense.onnx")
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # the exporter's progress report is not let through
    assert dense_file.max_abs_diff is not None and dense_file.max_abs_diff <= TOLERANCE
    assert _ops(dense_file.path)["Conv"] == 4
    assert onnx_file.bytes < dense_file.bytes


def test_the_onnx_batch_dimension_is_dynamic(onnx_file: Exported, factorized: Path):
    graph = onnx.load(str(onnx_file.path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = onnxruntime.InferenceSession(str(onnx_file.path), providers=["CPUExecutionProvider"])
    model = load(factorized)
    for size in (1, 3, 17):
        images = torch.rand(size, 1, 8, 8)
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(logits), model(images), atol=TOLERANCE)


def test_opset_17_is_written_as_17_quietly_and_keeps_the_factorized_layers(factorized: Path, tmp_path: Path,
                                                                          capfd: pytest.CaptureFixture[str]):
    result = export(factorized, "onnx", out=tmp_path / "m17.onnx", opset=17)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert result.opset == 17 == onnx.load(str(result.path)).opset_import[0].version
    assert result.max_abs_diff is not None and result.max_abs_diff <= TOLERANCE
    assert _ops(result.path)["Conv"] == 8
    with pytest.raises(ExportError, match="opset 16 is too old: use 18"):
        export(factorized, "onnx", opset=16)


@pytest.mark.parametrize(("fmt", "name"), [("torchscript", "model.torchscript.pt"), ("torch.export", "model.pt2")])
def test_torch_formats_export_quietly_match_pytorch_and_take_any_batch(fmt: str, name: str, factorized: Path,
                                                                      capfd: pytest.CaptureFixture[str]):
    result = export(factorized, fmt, check_batch=3, seed=1)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert result.path == factorized / name and result.bytes == result.path.stat().st_size
    assert result.max_abs_diff is not None and result.max_abs_diff <= TOLERANCE
    assert result.checked_with == f"torch {torch.__version__}" and result.opset is None
    with pytest.warns(FutureWarning) if fmt == "torchscript" else nullcontext():  # torch deprecates TorchScript
        loaded = torch.jit.load(str(result.path)) if fmt == "torchscript" else torch.export.load(result.path).module()
    model = load(factorized)
    with torch.no_grad():
        for size in (1, 6):
            images = torch.rand(size, 1, 8, 8)
            assert torch.allclose(loaded(images), model(images), atol=TOLERANCE)


def test_safetensors_is_the_folder_own_weights_copied_when_asked(factorized: Path, tmp_path: Path):
    weights = factorized / "model.safetensors"
    result = export(factorized, "safetensors")
    assert (result.path, result.bytes) == (weights, weights.stat().st_size)
    assert (result.max_abs_diff, result.checked_with, result.opset) == (None, None, None)
    copied = export(factorized, "safetensors", out=tmp_path / "copy" / "weights.safetensors")
    assert copied.path.read_bytes() == weights.read_bytes()
    into_folder = export(factorized, "safetensors", out=tmp_path / "copy")
    assert into_folder.path == tmp_path / "copy" / "model.safetensors"


def test_a_file_that_does_not_match_is_not_written(factorized: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "model.pt2").write_bytes(b"the earlier file")
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="differs from the PyTorch model by up to"):
        export(factorized, "torch.export", out=tmp_path / "model.pt2")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]  # no temporary file left behind
    assert (tmp_path / "model.pt2").read_bytes() == b"the earlier file"


def test_bad_requests_say_what_to_do(factorized: Path, tmp_path: Path):
    with pytest.raises(ExportError) as error:
        export(factorized, "tflite")
    assert all(fmt in str(error.value) for fmt in FORMATS)
    with pytest.raises(ExportError, match="at least one image"):
        export(factorized, "onnx", check_batch=0)
    with pytest.raises(ArtifactError, match="holds no compiled model"):
        export(tmp_path / "missing", "onnx")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ExportError, match="cannot write .*choose another --out"):
        export(factorized, "torchscript", out=tmp_path / "a-file" / "model.pt")


def test_an_opset_the_exporter_cannot_write_is_refused_not_silently_replaced(factorized: Path, tmp_path: Path):
    # The dynamo exporter keeps opset 18, with only a log line, when it cannot convert to the one asked for.
    with pytest.raises(ExportError, match="use --opset 18"):
        export(factorized, "onnx", out=tmp_path / "m30.onnx", opset=30)
    assert list(tmp_path.iterdir()) == []
