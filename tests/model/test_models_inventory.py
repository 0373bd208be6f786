"""Model building (cstar_dsl/model/zoo.py) and the layer inventory (cstar_dsl/model/inventory.py).

The registry builds torchvision classifiers (with their CIFAR variants) and our own small CNNs;
weights load from safetensors or a torch.save state dict, and every way a weights file can be
wrong is a located SpecProblem, never a traceback. Tracing names the module it cannot trace and
suggests marking it a leaf; the inventory's facts are checked by hand on a tiny CNN.
"""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cstar_dsl import api
from cstar_dsl.cli import main
from cstar_dsl.lang.problems import SpecProblem
from cstar_dsl.lang.spec import ModelSpec
from cstar_dsl.lang.validate import check_file, load_spec
from cstar_dsl.model import inventory
from cstar_dsl.model import zoo as models
from cstar_dsl.model.decompose import spectra
from tests.helpers import DIGITS, line_of, variant


def model_spec(arch: str, classes: int = 10, shape: tuple[int, int, int] = (3, 32, 32), **options) -> ModelSpec:
    return ModelSpec(arch=arch, classes=classes, input=shape, **options)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def digits_recipe(folder: Path, model_lines: str = "", name: str = "recipe.cstar", arch: str = "cstar:digits-cnn",
                  compress_lines: str = "") -> Path:
    """specs/digits.cstar with another model (and more `model` lines), and these `compress` lines."""
    compress = f"\ncompress {{\n{compress_lines}}}\n" if compress_lines else ""
    return variant(folder, DIGITS, f'model {{\n  arch = "{arch}"\n{model_lines}}}\n{compress}', name)


# ================================================================== registry


def test_cifar_resnet18_has_the_known_parameter_count():
    model = models.build_model(model_spec("torchvision:resnet18", stem="cifar"))
    assert count(model) == 11_173_962
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity) and model.fc.out_features == 10
    assert not model.training, "models are built in eval mode"
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_standard_resnet18_keeps_the_imagenet_stem():
    model = models.build_model(model_spec("torchvision:resnet18", classes=100, shape=(3, 64, 64)))
    assert (model.conv1.kernel_size, model.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(model.maxpool, nn.MaxPool2d) and model.fc.out_features == 100


def test_other_cifar_variants():
    vgg = models.build_model(model_spec("torchvision:vgg16_bn", stem="cifar"))
    assert isinstance(vgg.classifier, nn.Linear) and (vgg.classifier.in_features, vgg.classifier.out_features) == (
        512, 10)
    mobilenet = models.build_model(model_spec("torchvision:mobilenet_v2", stem="cifar"))
    assert mobilenet.features[0][0].stride == (1, 1)
    with torch.no_grad():
        assert vgg(torch.zeros(1, 3, 32, 32)).shape == mobilenet(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_mnist_cnn_has_about_580k_parameters():
    model = models.build_model(model_spec("cstar:mnist-cnn", shape=(1, 28, 28)))
    assert 570_000 <= count(model) <= 590_000, count(model)
    convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert convs / count(model) > 0.99  # nearly all in 3x3 convs
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(("arch", "width", "low", "high"), [("cstar:mnist-cnn-x2", 2, 2.25e6, 2.4e6),
                                                           ("cstar:mnist-cnn-x4", 4, 9.2e6, 9.4e6)])
def test_wide_mnist_cnns_scale_every_layer(arch, width, low, high):
    base = models.build_model(model_spec("cstar:mnist-cnn", shape=(1, 28, 28)))
    wide = models.build_model(model_spec(arch, shape=(1, 28, 28)))
    assert low <= count(wide) <= high, count(wide)
    widths = [m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [width * m.out_channels for m in base.modules() if isinstance(m, nn.Conv2d)]
    assert wide.fc.in_features == width * base.fc.in_features and wide.fc.out_features == 10


def test_digits_cnn_builds_for_8x8_inputs():
    model = models.build_model(model_spec("cstar:digits-cnn", shape=(1, 8, 8)))
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert model.features[0].in_channels == 1 and model.fc.in_features == 128


def test_mlp_takes_the_flattened_input():
    model = models.build_model(model_spec("cstar:mlp", classes=3, shape=(2, 4, 4)))
    assert model.fc1.in_features == 32 and model.fc3.out_features == 3
    with torch.no_grad():
        assert model(torch.zeros(5, 2, 4, 4)).shape == (5, 3)


@pytest.mark.parametrize("arch", ["torchvision:shufflenet_v2_x0_5", "torchvision:squeezenet1_1"])
def test_cifar_stem_without_a_variant_is_unsupported(arch):
    with pytest.raises(SpecProblem) as caught:
        models.build_model(model_spec(arch, stem="cifar"))
    assert (caught.value.code, caught.value.loc) == ("unsupported-stem", ("model", "stem"))
    assert arch.split(":")[1] in caught.value.message and "stem = standard" in (caught.value.help or "")


def test_unsupported_stem_points_at_the_stem_line(tmp_path):
    path = digits_recipe(tmp_path, "  stem = cifar\n", arch="torchvision:squeezenet1_1")
    checked = check_file(path)
    with pytest.raises(SpecProblem) as caught:
        api.build_model(checked.spec)
    diagnostic = checked.diagnostic(caught.value)
    assert diagnostic.code == "unsupported-stem"
    assert (diagnostic.span.line, diagnostic.span.column) == (line_of(path, "stem = cifar"), 10)  # its value


def test_imported_models_need_permission():
    with pytest.raises(SpecProblem) as caught:
        models.build_model(ModelSpec.model_construct(arch="collections:OrderedDict", classes=10, input=(1, 8, 8),
                                                     stem="standard", weights=None, leaf=()))
    assert caught.value.code == "import-not-allowed"


# =================================================================== weights


@pytest.fixture
def source():
    torch.manual_seed(1)
    return models.build_model(model_spec("cstar:digits-cnn", shape=(1, 8, 8)))


def _build_with(folder: Path, weights: str):
    spec = load_spec(digits_recipe(folder, f'  weights = "{weights}"\n'))
    return api.build_model(spec)


def _same_state(model: nn.Module, other: nn.Module) -> bool:
    theirs = other.state_dict()
    return all(torch.equal(value, theirs[key]) for key, value in model.state_dict().items())


def test_weights_load_from_safetensors(tmp_path, source):
    save_file(source.state_dict(), str(tmp_path / "digits.safetensors"))
    model = _build_with(tmp_path, "digits.safetensors")
    assert _same_state(model, source) and not model.training


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module-prefix", "compile-prefix"])
def test_weights_load_from_a_torch_save_state_dict(tmp_path, source, wrap):
    state = source.state_dict()
    if wrap == "state_dict":
        state = {"state_dict": state}
    elif wrap == "module-prefix":
        state = {f"module.{key}": value for key, value in state.items()}
    elif wrap == "compile-prefix":
        state = {f"_orig_mod.{key}": value for key, value in state.items()}
    torch.save(state, tmp_path / "digits.pt")
    assert _same_state(_build_with(tmp_path, "digits.pt"), source)


def test_a_shape_mismatch_names_the_layer(tmp_path):
    torch.manual_seed(2)
    other = models.build_model(model_spec("cstar:digits-cnn", classes=5, shape=(1, 8, 8)))
    torch.save(other.state_dict(), tmp_path / "five.pt")
    with pytest.raises(SpecProblem) as caught:
        _build_with(tmp_path, "five.pt")
    problem = caught.value
    assert (problem.code, problem.loc) == ("weights-mismatch", ("model", "weights"))
    assert "five.pt" in problem.message
    assert "shape mismatch fc.weight: file (5, 128) vs model (10, 128)" in problem.notes
    assert "shape mismatch fc.bias: file (5,) vs model (10,)" in problem.notes


def test_missing_and_unexpected_tensors_are_listed(tmp_path, source):
    state = dict(source.state_dict())
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(SpecProblem) as caught:
        _build_with(tmp_path, "partial.safetensors")
    assert caught.value.code == "weights-mismatch"
    assert {"missing fc.bias", "unexpected extra.weight"} <= set(caught.value.notes)


class _NotATensor:
    pass


@pytest.mark.parametrize(("name", "content"), [
    ("garbage.pt", b"\x00\x01 this is not a checkpoint \xff" * 10),
    ("garbage.safetensors", b"\xff\xfe not safetensors at all"),
    ("empty.pt", b""),
    ("hostile.pt", pickle.dumps(_NotATensor())),
    ("list.pt", None),
    ("strings.pt", None),
])
def test_an_unreadable_weights_file_is_a_problem_not_a_traceback(tmp_path, name, content):
    path = tmp_path / name
    if name == "list.pt":
        torch.save([torch.zeros(2)], path)
    elif name == "strings.pt":
        torch.save({"fc.weight": "not a tensor"}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(SpecProblem) as caught:
        _build_with(tmp_path, name)
    assert (caught.value.code, caught.value.loc) == ("unreadable-weights", ("model", "weights"))
    assert name in caught.value.message


class _Payload:
    """Unpickling this (without weights_only) would create the marker file: code from the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_is_never_unpickled_as_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": _Payload(marker)}, tmp_path / "hostile.pt")
    with pytest.raises(SpecProblem) as caught:
        _build_with(tmp_path, "hostile.pt")
    assert caught.value.code == "unreadable-weights"
    assert not marker.exists(), "loading the weights ran code from the checkpoint"


def test_a_missing_weights_file(tmp_path):
    with pytest.raises(SpecProblem) as caught:
        _build_with(tmp_path, "nowhere.pt")
    assert caught.value.code == "weights-not-found"


def test_the_cli_reports_bad_weights_at_the_weights_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"garbage" * 50)
    path = digits_recipe(tmp_path, '  weights = "garbage.pt"\n')
    assert main(["plan", "recipe.cstar"]) == 1
    out = capsys.readouterr().out
    assert "error[unreadable-weights]: cannot read garbage.pt" in out
    line = line_of(path, 'weights = "garbage.pt"')
    assert f" --> recipe.cstar:{line}:13" in out and "Traceback" not in out


# ==================================================================== tracing


BRANCHY = textwrap.dedent('''
    import torch
    from torch import nn


    class Gate(nn.Module):
        """Its forward branches on a tensor value: torch.fx cannot trace it."""

        def __init__(self, channels):
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x):
            if x.mean() > 0:
                return self.conv(x)
            return x


    class Net(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1)
            self.blocks = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), Gate(16))
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            x = self.blocks(torch.relu(self.stem(x)))
            return self.fc(x.mean(dim=(2, 3)))


    def build(num_classes):
        return Net(num_classes)
''')


@pytest.fixture
def branchy(tmp_path, monkeypatch):
    (tmp_path / "branchy_model.py").write_text(BRANCHY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_an_untraceable_module_is_named_with_a_leaf_suggestion(branchy):
    path = digits_recipe(branchy, arch="branchy_model:build")
    checked = check_file(path, allow_import=True)
    model = api.build_model(checked.spec, allow_import=True)
    with pytest.raises(SpecProblem) as caught:
        api.make_plan(checked.spec, model)
    problem = caught.value
    assert (problem.code, problem.loc) == ("untraceable-model", ("model", "arch"))
    assert "`blocks.1` (Gate)" in problem.message
    assert 'leaf = ["blocks.1"]' in (problem.help or "")
    diagnostic = checked.diagnostic(problem)
    assert diagnostic.span.line == line_of(path, 'arch = "branchy_model:build"')


def test_the_untraceable_note_points_at_the_models_source_line(branchy):
    import branchy_model

    line = BRANCHY.splitlines().index("        if x.mean() > 0:") + 1
    with pytest.raises(SpecProblem) as caught:
        inventory.trace(branchy_model.build(10))
    assert any(note.endswith(f"branchy_model.py:{line}") for note in caught.value.notes), caught.value.notes


@pytest.mark.parametrize("leaf", ["blocks.1", "Gate"])
def test_marking_it_a_leaf_makes_it_traceable(branchy, leaf):
    path = digits_recipe(branchy, f'  leaf = ["{leaf}"]\n', arch="branchy_model:build",
                         compress_lines="  budget = 1.5x params\n  keep = []\n")
    spec = check_file(path, allow_import=True).spec
    assert spec.model.leaf == (leaf,)
    model = api.build_model(spec, allow_import=True)
    plan = api.make_plan(spec, model)
    assert [layer.name for layer in plan.layers] == ["blocks.0", "fc", "stem"]  # blocks.1.conv is inside the leaf
    graph = api.factorize(model, plan, spec)
    assert type(graph.get_submodule("blocks.1")).__name__ == "Gate"
    with torch.no_grad():
        assert graph(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_an_untraceable_top_level_model():
    class Whole(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x[..., :2]

    with pytest.raises(SpecProblem) as caught:
        inventory.trace(Whole())
    assert caught.value.code == "untraceable-model" and "the model itself" in caught.value.message
    assert 'leaf = ["Whole"]' in (caught.value.help or "")


# ================================================================== inventory


class Tiny(nn.Module):
    """3x8x8 -> conv1 3->8 (3x3, pad 1) -> conv2 8->16 (3x3, stride 2, pad 1) -> depthwise 16 (3x3, pad 1)
    -> point 16->4 (1x1, called twice) -> 64 features: fc 64->10, and tokens 8->8 on 8 tokens of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.point = nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(64, 10)
        self.tokens = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        x = self.point(x) + self.point(2 * x)
        tokens = self.tokens(x.reshape(-1, 8, 8))
        return self.fc(torch.flatten(x, 1)) + tokens.sum(dim=(1, 2)).unsqueeze(1)


def test_inventory_facts_of_a_tiny_cnn():
    torch.manual_seed(0)
    model = Tiny().eval()
    found = inventory.collect(model, (3, 8, 8))
    layers = {layer.name: layer for layer in found.layers}
    assert list(layers) == ["conv1", "conv2", "depthwise", "point", "fc", "tokens"]  # in the model's order

    facts = {name: (layer.type_name, layer.in_features, layer.out_features, layer.kernel, layer.groups, layer.calls,
                    layer.in_positions, layer.out_positions, layer.params, layer.macs, layer.shape)
             for name, layer in layers.items()}
    assert facts == {
        # name:       type      in  out  kernel  groups calls in_pos out_pos params  MACs    shape
        "conv1": ("Conv2d", 3, 8, (3, 3), 1, 1, 64, 64, 216, 216 * 64, (8, 3, 3, 3)),
        "conv2": ("Conv2d", 8, 16, (3, 3), 1, 1, 64, 16, 1152, 1152 * 16, (16, 8, 3, 3)),
        "depthwise": ("Conv2d", 16, 16, (3, 3), 16, 1, 16, 16, 144, 144 * 16, (16, 1, 3, 3)),
        "point": ("Conv2d", 16, 4, (1, 1), 1, 2, 16, 16, 64, 64 * 16, (4, 16, 1, 1)),
        "fc": ("Linear", 64, 10, (1, 1), 1, 1, 1, 1, 640, 640, (10, 64)),
        "tokens": ("Linear", 8, 8, (1, 1), 1, 1, 8, 8, 64, 64 * 8, (8, 8)),
    }
    total = sum(p.numel() for p in model.parameters())
    assert found.total_params == total
    biases = 8 + 16 + 4 + 10 + 8  # conv1, depthwise, point, fc, tokens (conv2 has none)
    assert found.other_params == biases + 16 == total - sum(layer.params for layer in found.layers)  # + bn


def test_inventory_spectra_are_normalized_and_only_for_plannable_layers():
    torch.manual_seed(0)
    model = Tiny().eval()
    layers = {layer.name: layer for layer in inventory.collect(model, (3, 8, 8)).layers}
    assert layers["depthwise"].energies == () and layers["point"].energies == ()  # grouped; called twice
    conv2 = layers["conv2"]
    assert [len(e) for e in conv2.energies] == [16, 8]
    for spectrum, values in zip(conv2.energies, spectra(model.conv2.weight), strict=True):
        assert sum(spectrum) == pytest.approx(1.0)
        assert list(spectrum) == sorted(spectrum, reverse=True)
        expected = (values.double() ** 2 / (values.double() ** 2).sum()).tolist()
        assert list(spectrum) == pytest.approx(expected)
    assert [len(e) for e in layers["fc"].energies] == [10]


def test_inventory_leaves_the_model_unchanged_and_in_eval_mode():
    model = Tiny().train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    inventory.collect(model, (3, 8, 8))
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert not any(module._forward_hooks for module in model.modules())


def test_inventory_of_registry_models():
    digits = inventory.collect(models.build_model(model_spec("cstar:digits-cnn", shape=(1, 8, 8))), (1, 8, 8))
    names = [layer.name for layer in digits.layers]
    assert names == ["features.0", "features.3", "features.7", "features.10", "fc"]  # in the model's order
    facts = {layer.name: (layer.in_positions, layer.out_positions, layer.params) for layer in digits.layers}
    assert facts["features.0"] == (64, 64, 32 * 9) and facts["features.7"] == (16, 16, 64 * 128 * 9)
    assert facts["fc"] == (1, 1, 1280)


@pytest.mark.parametrize(("arch", "head"), [("resnet18", "fc"), ("vgg16_bn", "classifier.6"),
                                            ("mobilenet_v2", "classifier.1"), ("squeezenet1_0", "classifier.1")])
def test_the_output_layer_is_found_through_reshapes_pooling_and_dropout(arch, head):
    import torchvision

    model = getattr(torchvision.models, arch)(num_classes=10)
    assert inventory.output_layers(inventory.trace(model)) == {head}


def test_no_output_layer_where_layers_are_mixed_into_the_output():
    torch.manual_seed(0)
    layers = inventory.collect(Tiny().eval(), (3, 8, 8)).layers
    assert not any(layer.produces_output for layer in layers)  # the output is fc(...) + tokens(...)


def test_every_head_of_a_model_with_several_outputs_is_an_output_layer():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3)
            self.classes = nn.Linear(8, 10)
            self.boxes = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            features = self.body(x).mean(dim=(2, 3))
            return {"classes": self.classes(features), "boxes": (self.boxes(features),)}

    layers = inventory.collect(TwoHeads(), (3, 8, 8)).layers
    assert {layer.name for layer in layers if layer.produces_output} == {"classes", "boxes"}


def test_the_digits_cnn_classifier_is_its_output_layer():
    digits = inventory.collect(models.build_model(model_spec("cstar:digits-cnn", shape=(1, 8, 8))), (1, 8, 8))
    assert [layer.name for layer in digits.layers if layer.produces_output] == ["fc"]
