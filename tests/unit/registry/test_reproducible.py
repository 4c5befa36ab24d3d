"""What the project promises to be the same every time: the installed packages (the lock) and, on one
CPU, the adapter a seed and a config train to."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import DEMO_DATA, REPO

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


def _torch_closure() -> set[str]:
    from registry.lineage import installed_environment, torch_closure

    return torch_closure(installed_environment())


@pytest.mark.skipif(os.environ.get("QLORA_UNLOCKED") == "1", reason="QLORA_UNLOCKED=1: a hand-made environment")
def test_the_environment_is_exactly_the_lock():
    """`make install` (and so .ci/run) installs the lock's versions and nothing else, but for torch's own closure
    (torch has its own pin; the CUDA build adds nvidia-*, cuda-*, triton). pip freeze is the independent reading."""
    locked, installed, torchs = _canonical(_locked()), _canonical(_installed()), _torch_closure()
    differ = sorted(f"{k}: locked {locked.get(k)}, installed {installed.get(k)}" for k in locked.keys() | installed.keys()
                    if locked.get(k) != installed.get(k) and not (k not in locked and k in torchs))
    assert not differ, "environment differs from requirements.lock (run `make install`, or `make lock` after " \
                       "changing pyproject.toml):\n" + "\n".join(differ)
    assert torch.__version__.split("+")[0] == "2.13.0"


def _freeze_is_the_lock() -> bool:
    locked, installed, torchs = _canonical(_locked()), _canonical(_installed()), _torch_closure()
    return all(locked.get(k) == installed.get(k) or (k not in locked and k in torchs) for k in locked.keys() | installed.keys())


def test_lineage_says_whether_the_install_is_the_lock():
    from registry.lineage import install_is_locked

    assert install_is_locked() == _freeze_is_the_lock()


# What a plain Linux machine resolves for torch==2.13.0 from the package index (the CUDA 13 build), recorded with
# pip's --dry-run --report: metadata only, no GB download. See the fixture's _about.
CUDA_CLOSURE = json.loads((REPO / "tests" / "fixtures" / "torch-2.13.0-cuda-closure.json").read_text())


def _cuda_environment() -> dict[str, tuple[str, list[str]]]:
    """The lock's packages plus the CUDA build of torch and everything its metadata pulls in."""
    from registry.lineage import _canonical as canon

    env = {k: (v, []) for k, v in _canonical(_locked()).items()}
    return env | {canon(n): (p["version"], p["requires_dist"]) for n, p in CUDA_CLOSURE["packages"].items()}


def test_the_lock_holds_with_the_cuda_build_of_torch():
    from registry.lineage import lock_differences, torch_closure

    env = _cuda_environment()
    build = torch_closure(env, build_only=True)
    assert len(build) == 19 and "triton" in build and "nvidia-cublas" in build and "cuda-toolkit" in build, sorted(build)
    assert not build & _canonical(_locked()).keys(), "the lock, made on the CPU build, holds none of the CUDA closure"
    assert lock_differences(_canonical(_locked()), env) == []


def test_the_lock_check_still_catches_what_torch_did_not_bring():
    from registry.lineage import lock_differences

    locked, env = _canonical(_locked()), _cuda_environment()
    stray = env | {"nvidia-cudnn-cu12": ("9.1.0.70", []), "requests": ("0.0.1", [])}
    assert lock_differences(locked, stray) == ["nvidia-cudnn-cu12: locked None, installed 9.1.0.70",
                                               f"requests: locked {locked['requests']}, installed 0.0.1"]
    del env["sympy"]  # torch's, but the lock names it: still the lock's to check
    assert lock_differences(locked, env) == [f"sympy: locked {locked['sympy']}, installed None"]


def test_a_worker_without_the_extras_is_still_the_lock():
    """`make install EXTRAS=` (a worker that only runs flows) leaves out pytest, trl, optuna and what only they
    need; leaving out anything the pipeline itself needs is still a difference."""
    from registry.lineage import closure, installed_environment, lock_differences

    locked, env = _canonical(_locked()), installed_environment()
    if "qlora-pipeline" not in env:
        pytest.skip("the project is not installed here: its metadata says which requirements are extras")
    extras_only = locked.keys() - closure(env, ["qlora-pipeline", "torch"])
    assert {"pytest", "trl", "optuna"} <= extras_only and "transformers" not in extras_only
    worker = {k: v for k, v in env.items() if k not in extras_only}
    assert lock_differences(locked, worker) == []
    del worker["peft"]
    assert lock_differences(locked, worker) == [f"peft: locked {locked['peft']}, installed None"]


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
    assert install_is_locked() == _freeze_is_the_lock()
