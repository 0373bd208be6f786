"""The evaluate stage's attack settings and names, the artifact files and their errors, and the
small pieces compile builds on (augmentation, re-read spectra, structure-only factorization)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cstar_dsl.deploy.artifacts import ArtifactError, load, model_description, save_model
from cstar_dsl.eval.evaluation import attack_for, attack_name, evaluate
from cstar_dsl.lang.spec import EvaluateSpec, FgsmAttack, ModelSpec, PgdAttack, ThreatSpec
from cstar_dsl.model import inventory
from cstar_dsl.model import zoo as models
from cstar_dsl.model.factorized import LowRankLinear
from cstar_dsl.model.rewrite import factorize_ranks
from cstar_dsl.train.attacks import Fgsm, Pgd
from cstar_dsl.train.data import augment

THREAT = ThreatSpec(norm="linf", eps=0.3, step=0.1, steps=7)


def test_evaluation_attacks_take_unset_settings_from_the_threat():
    assert attack_for(PgdAttack(steps=20), THREAT) == Pgd(eps=0.3, step=0.1, steps=20, norm="linf")
    assert attack_for(PgdAttack(steps=40, step=0.01), THREAT) == Pgd(eps=0.3, step=0.01, steps=40, norm="linf")
    assert attack_for(PgdAttack(eps=0.05), THREAT).step == 0.05  # the threat's step is capped by a smaller eps
    assert attack_for(FgsmAttack(), THREAT) == Fgsm(0.3)


def test_attack_names_state_their_settings():
    assert attack_name(Pgd(eps=0.3, step=0.01, steps=20, restarts=2)) == \
        "pgd(linf, eps=0.3, step=0.01, steps=20, restarts=2)"
    assert attack_name(Fgsm(8 / 255)) == "fgsm(linf, eps=0.0313725)"


def test_evaluate_is_deterministic_and_counts_the_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    images, labels = torch.rand(50, 1, 4, 4), torch.randint(0, 3, (50,))
    test = torch.utils.data.TensorDataset(images, labels)
    settings = EvaluateSpec(attacks=(PgdAttack(steps=5), FgsmAttack()), samples=30)
    first = evaluate(model, test, settings, THREAT, seed=0, device=torch.device("cpu"))
    second = evaluate(model, test, settings, THREAT, seed=0, device=torch.device("cpu"))
    assert first.samples == 30
    assert (first.clean, first.robust) == (second.clean, second.robust)
    assert first.worst_robust == min(first.robust.values()) <= first.clean


def test_load_explains_a_folder_without_a_model(tmp_path):
    with pytest.raises(ArtifactError, match="model.json is missing"):
        load(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"schema": "something else"}))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="not a cstar model description"):
        load(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"schema": "cstar.model/1"}))
    with pytest.raises(ArtifactError, match="cannot read .*model.safetensors"):
        load(tmp_path)


def test_a_saved_dense_model_loads_back_exactly(tmp_path):
    spec = ModelSpec(arch="cstar:mlp", classes=10, input=(1, 8, 8))
    model = models.Normalized(models.build_model(spec, seed=3), (0.5,), (0.25,))
    save_model(tmp_path, model, model_description(spec, "cstar", {"kind": "dense"}, (0.5,), (0.25,)))
    loaded = load(tmp_path)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_mismatched_description_is_an_artifact_error(tmp_path):
    spec = ModelSpec(arch="cstar:mlp", classes=10, input=(1, 8, 8))
    model = models.Normalized(models.build_model(spec), (0.5,), (0.25,))
    save_model(tmp_path, model, model_description(spec, "cstar", {"kind": "factorized", "ranks": {"fc1": [4]}},
                                                  (0.5,), (0.25,)))
    with pytest.raises(ArtifactError, match="do not fit"):
        load(tmp_path)


def test_augmentation_keeps_shape_and_range_and_never_flips_digits():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 28, 28)
    out = augment(images, "mnist", generator)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, images)  # some crop moved
    symmetric = torch.zeros(8, 1, 28, 28)
    symmetric[:, :, 10:18, 3:6] = 1.0  # a bar on the left: a crop moves it by 2 at most, a flip would move it across
    assert augment(symmetric, "mnist", generator)[:, :, :, 20:].sum() == 0


def test_with_weights_rereads_the_spectra():
    spec = ModelSpec(arch="cstar:mlp", classes=10, input=(1, 8, 8))
    model = models.build_model(spec)
    layers = inventory.collect(model, spec.input).layers
    rank_one = torch.outer(torch.randn(256), torch.randn(64))
    updated = {layer.name: layer for layer in inventory.with_weights(layers, {"fc1": rank_one})}
    assert updated["fc1"].energies[0][0] == pytest.approx(1.0, abs=1e-6)
    assert updated["fc2"] == next(layer for layer in layers if layer.name == "fc2")


def test_structure_only_factorization_has_the_ranks_and_leaves_the_model_alone():
    spec = ModelSpec(arch="cstar:mlp", classes=10, input=(1, 8, 8))
    model = models.build_model(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = factorize_ranks(model, {"fc2": (7,)}, decompose=False)
    assert isinstance(graph.get_submodule("fc2"), LowRankLinear) and graph.get_submodule("fc2").rank == 7
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
