"""What the project promises to be the same every time: the installed packages (the lock) and, on one
CPU, the adapter a seed and a config train to."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from .conftest import DEMO_DATA, REPO

TRAIN = """
import hashlib, json, sys
from qlora.config.schema import DataConfig, LoraSection, ModelConfig, QuantizationConfig, TrainConfig
from tasks.quantize import prepare_quantized_model
from tasks.tokenize import tokenize_dataset
from tasks.train import train_adapter
base_dir, work, data_path = sys.argv[1:4]
model = ModelConfig(name_or_path=base_dir)
data = tokenize_dataset(DataConfig(path=data_path, max_length=64, eval_fraction=0.02), model, work)
base = prepare_quantized_model(model, QuantizationConfig(compute_dtype="float32"), work)
a = train_adapter(base, data, LoraSection(r=8, alpha=16, dropout=0.05), TrainConfig(max_steps=6,
    per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=2e-3, save_steps=100, seed=11), work)
print("SHA " + hashlib.sha256(open(a.path + "/adapter_model.safetensors", "rb").read()).hexdigest())
"""


def _locked() -> dict[str, str]:
    lines = (REPO / "requirements.lock").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def _installed() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable", "--exclude", "torch"],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("==", 1) for line in out.splitlines() if "==" in line)


def _canonical(pins: dict[str, str]) -> dict[str, str]:
    return {k.lower().replace("_", "-").replace(".", "-"): v for k, v in pins.items()}


@pytest.mark.skipif(os.environ.get("QLORA_UNLOCKED") == "1", reason="QLORA_UNLOCKED=1: a hand-made environment")
def test_the_environment_is_exactly_the_lock():
    """`make install` (and so .ci/run) installs the lock's versions and nothing else (torch has its own pin)."""
    locked, installed = _canonical(_locked()), _canonical(_installed())
    differ = sorted(f"{k}: locked {locked.get(k)}, installed {installed.get(k)}" for k in locked.keys() | installed.keys()
                    if locked.get(k) != installed.get(k))
    assert not differ, "environment differs from requirements.lock (run `make install`, or `make lock` after " \
                       "changing pyproject.toml):\n" + "\n".join(differ)
    assert torch.__version__.split("+")[0] == "2.13.0"


def test_lineage_says_whether_the_install_is_the_lock():
    from registry.lineage import install_is_locked

    assert install_is_locked() == (_canonical(_locked()) == _canonical(_installed()))


@pytest.mark.slow  # two trainings in fresh processes: ~17 s
def test_same_seed_and_config_train_the_same_adapter_on_this_cpu(tiny_base, tmp_path):
    """Two processes, same machine, same seed and config: bit-identical adapter files (float32 compute, so
    the check holds on any CPU; README says where identity cannot hold)."""
    shas = []
    for i in range(2):
        out = subprocess.run([sys.executable, "-c", TRAIN, str(tiny_base), str(tmp_path / f"w{i}"), str(DEMO_DATA)],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        shas.append(out.stdout.split("SHA ", 1)[1].split()[0])
    assert shas[0] == shas[1]


def test_lock_check_ignores_folders_added_to_sys_path():
    """Importing setuptools (torch.compile's inductor does) adds its _vendor folder to sys.path; the vendored
    metadata there (packaging, zipp, jaraco.*, ...) must not read as the environment's installed packages."""
    import setuptools  # noqa: F401

    from registry.lineage import install_is_locked

    assert any(p.endswith("_vendor") for p in sys.path)
    assert install_is_locked() == (_canonical(_locked()) == _canonical(_installed()))
