"""Registry names known to the spec stage: models, data sets, attacks, layer types (pure, no torch).

The builders behind these names live in later stages; this module only lists them, so that
`cstar check` can validate a recipe and suggest a fix without importing torch.
"""

from __future__ import annotations

import re

# torchvision"s classification models (torchvision.models.list_models(module=torchvision.models));
# a test keeps this list equal to the installed torchvision"s.
TORCHVISION_MODELS: tuple[str, ...] = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny",
    "densenet121", "densenet161", "densenet169", "densenet201", "efficientnet_b0",
    "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l",
    "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "mobilenet_v2",
    "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf", "regnet_x_1_6gf",
    "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf",
    "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18",
    "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s",
    "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2",
    "wide_resnet50_2",
)

# The project"s own small architectures.
CSTAR_MODELS: tuple[str, ...] = ("digits-cnn", "mnist-cnn", "mnist-cnn-x2", "mnist-cnn-x4", "mlp")

DATASETS: tuple[str, ...] = ("digits", "mnist", "cifar10", "cifar100", "imagenet")
FACTORIZABLE_LAYER_TYPES: tuple[str, ...] = ("Conv2d", "Linear")
METHODS: tuple[str, ...] = ("cstar", "svd-finetune", "channel-prune", "auto")
# What `method = auto` chooses from by default: a low-rank plan, or channels removed uniformly or ranked globally.
STRUCTURES: tuple[str, ...] = ("low-rank", "prune-uniform", "prune-global")
# Channels removed uniformly, then what the layers keep factorized: `joint-25` gives channels a quarter of the
# compression (on a log scale) and ranks the rest; `joint` is `joint-50`.
# `joint-fisher` removes channels and cuts ranks of least Fisher score on the adversarial loss per weight saved,
# measured at compile time (plan/robust.py).
JOINT = "joint"
JOINT_FISHER = "joint-fisher"
JOINT_SHARES: tuple[int, ...] = tuple(range(5, 100, 5))
JOINT_STRUCTURES: tuple[str, ...] = (JOINT, *(f"{JOINT}-{share}" for share in JOINT_SHARES), JOINT_FISHER)
_CHANNEL_SHARES = {JOINT: 0.5, **{f"{JOINT}-{share}": share / 100 for share in JOINT_SHARES}}
EXPORT_FORMATS: tuple[str, ...] = ("safetensors", "onnx", "torchscript")


def channel_share(structure: str) -> float | None:
    """The share of the compression a joint structure gives channel pruning (None: not a joint structure)."""
    return _CHANNEL_SHARES.get(structure)


def is_joint(structure: str) -> bool:
    """Whether a structure both removes channels and factorizes what they keep."""
    return structure in JOINT_STRUCTURES


def channel_allocation(structure: str) -> str:
    """How a structure that removes channels spreads them: one global ranking, or a uniform share (joint too)."""
    return "global" if structure == "prune-global" else "uniform"


_MODULE_PREFIXES = ("module.", "_orig_mod.")
_IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def registry_names() -> tuple[str, ...]:
    """Every model name a recipe may use without ``--allow-import``."""
    return tuple(f"torchvision:{n}" for n in TORCHVISION_MODELS) + tuple(f"cstar:{n}" for n in CSTAR_MODELS)


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the ``package.module:function`` form of a user"s own model factory."""
    return _IMPORT_PATH.fullmatch(name) is not None


def normalize_module_name(name: str) -> str:
    """Drop the wrapper prefixes that DDP and torch.compile add (``module.``, ``_orig_mod.``)."""
    while name.startswith(_MODULE_PREFIXES):
        name = name.split(".", 1)[1]
    return name
