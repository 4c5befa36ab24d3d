"""What a consumer checks before loading a registered version: MLflow's transformers flavor runs code and
unpickles files on load in two cases, and a registry writer controls both.

1. A model or tokenizer class that is not part of ``transformers`` (a repo's custom architecture): the
   flavor then calls ``from_pretrained(..., trust_remote_code=True)`` on the artifact, which imports and
   runs the Python files shipped in it (``mlflow/transformers/model_io.py``).
2. Weights as pickles (``*.bin``, ``*.pt``): ``from_pretrained`` would read them instead of safetensors.
3. The pyfunc loader (``python_function.loader_module``, and ``code`` put on ``sys.path``): only MLflow's
   transformers loader and this project's chat loader (``registry/chat.py``) are accepted.

Versions this pipeline registers have neither (built-in Llama/Qwen-style classes, safetensors adapters and
bases). ``qlora predict`` refuses a version with either, naming what it found; Python consumers call
``check_loadable`` before ``mlflow.pyfunc.load_model`` (README, "Consuming a registered model").
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora.errors import UserError

# mlflow.transformers: a bare-prompt version; registry.chat: a chat version (registry/chat.py).
LOADERS = ("mlflow.transformers", "registry.chat")
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UntrustedModel(UserError):
    """A registered version that would run code or unpickle files when loaded."""


def _artifact_files(uri: str, limit: int = 10_000) -> list[str]:
    """Every file under the model's artifact root (the registry resolves models:/ URIs itself)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    repo = ModelsArtifactRepository(uri) if uri.startswith("models:/") else get_artifact_repository(uri)
    out: list[str] = []
    todo: list[str | None] = [None]
    while todo and len(out) < limit:
        for f in repo.list_artifacts(todo.pop()) or []:
            (todo if f.is_dir else out).append(f.path)
    return out


def _local_base_problems(base: str) -> list[str]:
    """The pre-quantized base a logged adapter references by path (``local_base_model_path``)."""
    p = Path(base)
    if not p.is_dir():
        return []
    found = [f"{base}/{f.name}" for f in p.iterdir() if f.suffix in PICKLED]
    try:
        if json.loads((p / "config.json").read_text()).get("auto_map"):
            found.append(f"{base}/config.json maps its classes to code in the folder (auto_map)")
    except (OSError, ValueError):
        pass
    return found


def check_loadable(model_uri: str) -> None:
    """Raise ``UntrustedModel`` when loading ``model_uri`` with MLflow's transformers flavor would run code
    shipped with it or unpickle weights; return quietly for what this pipeline registers."""
    import mlflow
    import transformers

    flavors = mlflow.models.get_model_info(model_uri).flavors
    conf = flavors.get("transformers")
    if conf is None:
        return  # not a transformers model: the flavor in question does not load it
    pyfunc = flavors.get("python_function") or {}
    if pyfunc.get("loader_module") not in LOADERS or pyfunc.get("code"):
        # The pyfunc loader is a module name the registry writer chooses, and code/ is put on sys.path first.
        raise UntrustedModel(
            f"{model_uri}: its pyfunc loader is {pyfunc.get('loader_module')!r}"
            + (f" with code shipped in the artifact ({pyfunc['code']})" if pyfunc.get("code") else "")
            + f"; consumers here load only {' or '.join(LOADERS)} without shipped code"
        )
    classes = [conf.get("pipeline_model_type")] + [conf.get(f"{c}_type") for c in conf.get("components", [])]
    foreign = [c for c in classes if c and not hasattr(transformers, c)]
    if foreign:
        raise UntrustedModel(
            f"{model_uri}: {', '.join(foreign)} is not a transformers class; MLflow would load it with "
            "trust_remote_code=True and run the code shipped in the artifact. Not loaded: review that code and "
            "load it yourself if you trust whoever registered this version"
        )
    pickled = [f for f in _artifact_files(model_uri) if f.endswith(PICKLED)]
    pickled += _local_base_problems(conf.get("local_base_model_path") or "")
    if pickled:
        raise UntrustedModel(f"{model_uri}: holds pickled weights or remote code ({', '.join(pickled[:5])}); "
                             "consumers here load safetensors only. Re-register the model with safetensors weights")
