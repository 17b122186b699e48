"""Session fixtures the tests share: one tiny world, one GVM and one set of model families for every test that can
share them, built once. Markers: slow (a training run long enough for gold to rise), torchrun (2 processes)."""

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/datasets import: a stray hub call hangs
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import pytest  # noqa: E402
import torch  # noqa: E402

import gvm  # noqa: E402
from helpers import ENV, FAMILIES, REPO, TINY_WORLD, build_tiny_model, lora_value_model  # noqa: E402
from infra import models, world  # noqa: E402


@pytest.fixture(scope="session")
def default_world(tmp_path_factory):
    """A fresh folder in which `python gvm.py` runs with default paths and no world yet: it must build the
    world on first use and train a GVM. Yields (cwd, completed process)."""
    cwd = tmp_path_factory.mktemp("first_use")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "gvm.py"), "--max-steps", "400", "--eval-every", "200"],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return cwd, proc


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_world")
    world.build_world(str(root), TINY_WORLD, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_backbone(tiny_world):
    return str(tiny_world / "sft")


@pytest.fixture(scope="session")
def noisy_world(tmp_path_factory):
    """A quarter of the default world's pairs, with 25% of the training labels flipped (AlpacaFarm)."""
    root = tmp_path_factory.mktemp("noisy_world")
    world.build_world(
        str(root),
        world.WorldConfig(seed=7, label_flip=0.25, n_train_prompts=1000, n_eval_prompts=200, sft_steps=400),
        progress=False,
    )
    return root


@pytest.fixture(scope="session")
def tiny_policy(tiny_world):
    return models.load_pretrained(str(tiny_world / "sft"))


@pytest.fixture(scope="session")
def tiny_gvm(tiny_world, tmp_path_factory):
    """A GVM on the tiny world's backbone with a random head (training is not what these tests are about)."""
    backbone, tok = gvm.load_backbone(str(tiny_world / "sft"))
    model = gvm.ValueModel(backbone)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    folder = tmp_path_factory.mktemp("tiny_gvm")
    gvm.save_value_model(model, tok, str(folder), {"kind": "gvm"})
    return folder


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for kind in FAMILIES:
        build_tiny_model(kind, str(root / kind))
    return root


@pytest.fixture(scope="session")
def tiny_lora_gvm(tiny_world, tmp_path_factory):
    return lora_value_model(tiny_world, tmp_path_factory.mktemp("tiny_lora_gvm") / "gvm", "gvm")


@pytest.fixture(scope="session")
def tiny_lora_rm(tiny_world, tmp_path_factory):
    return lora_value_model(tiny_world, tmp_path_factory.mktemp("tiny_lora_rm") / "rm", "reward-model")
