"""``qlora reproduce models:/NAME/VERSION``: rebuild a registered version from its lineage alone and say whether
the same adapter comes out.

The lineage is what registration left: the version's MLflow run holds the full config (``config.json``,
logged when the run opened) and the directory its relative paths start from (tag ``qlora.cwd``); the
version's tags hold the base and data fingerprints (content keys), the git commit and library versions.
The flow (``flows/reproduce.py``) re-quantizes and re-tokenizes into a fresh workdir and stops, before any
training, when a fingerprint differs (``check_base``, ``check_data``); library and commit differences are
only warned about. The verdict compares the new ``adapter_model.safetensors`` with the registered one
(``peft/`` in the logged model): sha256 first (bit-identical is expected on CPU with float32 compute),
then the largest absolute difference of any tensor, which is what GPU runs (non-deterministic kernels,
bf16) are judged by.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pydantic import BaseModel

from qlora.config.schema import PipelineConfig
from qlora.errors import UserError
from qlora.refs import MlflowRun, QuantizedModel, TokenizedData
from qlora.tracking.records import CWD_TAG, read_config
from registry.lineage import git_commit, library_versions

ADAPTER = "adapter_model.safetensors"


class NotReproducible(UserError):
    """The version's data or base no longer matches its fingerprint: training again would not rebuild it."""


class Lineage(BaseModel):
    name: str
    version: str
    run: MlflowRun
    config: PipelineConfig
    tags: dict[str, str]
    cwd: str | None = None
    data_report: dict | None = None


def read_lineage(model_uri: str, tracking_uri: str) -> Lineage:
    """The version behind ``models:/NAME/VERSION`` (or ``@alias``), its run's config and its lineage tags."""
    import mlflow

    m = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", model_uri)
    if m is None:
        raise UserError(f"{model_uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    try:
        mv = client.get_model_version(m[1], m[2]) if m[2] else client.get_model_version_by_alias(m[1], m[3])
    except mlflow.exceptions.MlflowException as e:
        raise UserError(f"{model_uri}: no such model version in {tracking_uri} ({str(e).splitlines()[0][:200]})") from None
    run = MlflowRun(tracking_uri=tracking_uri, run_id=mv.run_id)
    config = read_config(run)
    if config is None:
        raise UserError(f"{model_uri}: its MLflow run {mv.run_id} has no config.json (registered before configs were "
                        "logged), so it cannot be rebuilt from its lineage")
    try:
        report = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/data/report.json")
    except Exception:  # older runs, or tokenize not tracked: per-source detail is optional
        report = None
    return Lineage(name=mv.name, version=str(mv.version), run=run, config=config, tags=dict(mv.tags),
                   cwd=client.get_run(mv.run_id).data.tags.get(CWD_TAG), data_report=report)


def rebased(config: PipelineConfig, cwd: str | None) -> PipelineConfig:
    """Relative local paths (base, data) resolved against the directory the version was trained in, when they
    exist there: reproducing from another directory then reads the same files. Hub ids stay as they are."""
    if not cwd:
        return config

    def at(p: str | None) -> str | None:
        return str(Path(cwd) / p) if p and not Path(p).is_absolute() and (Path(cwd) / p).exists() else p

    raw = config.model_dump(mode="json")
    raw["model"]["name_or_path"] = at(raw["model"]["name_or_path"])
    raw["data"]["path"], raw["data"]["eval_path"] = at(raw["data"]["path"]), at(raw["data"]["eval_path"])
    for s in raw["data"]["sources"]:
        s["path"] = at(s["path"])
    return PipelineConfig.model_validate(raw)


def environment_differences(lineage: Lineage) -> list[str]:
    """Warnings: a different git commit or library version may change the numbers, but need not."""
    out = []
    then, now = lineage.tags.get("git_commit", "unknown"), git_commit() or "unknown"
    if then != now:
        out.append(f"git commit differs: v{lineage.version} was trained at {then}, this checkout is {now}")
    libs = json.loads(lineage.tags.get("libraries", "{}"))
    here = library_versions()
    for lib in sorted(set(libs) | set(here)):
        if libs.get(lib) != here.get(lib):
            out.append(f"{lib} differs: {libs.get(lib, 'absent')} at registration, {here.get(lib, 'absent')} here")
    return out


def check_base(lineage: Lineage, base: QuantizedModel) -> None:
    want = lineage.tags.get("base.fingerprint")
    if want == base.fingerprint:
        return
    then = json.loads(lineage.tags.get("quantization", "{}")).get("bnb_4bit_compute_dtype")
    dtype = (f"; quantization.compute_dtype={lineage.config.quantization.compute_dtype} resolves to {base.compute_dtype} "
             f"here but was {then} where v{lineage.version} was trained, and the fingerprint covers it"
             if then and base.compute_dtype and then != base.compute_dtype else "")
    raise NotReproducible(
        f"model.name_or_path {lineage.config.model.name_or_path}: the base no longer matches v{lineage.version}'s "
        f"base.fingerprint ({want}, now {base.fingerprint}): its weights or config files changed{dtype}. "
        "Restore the base it was trained on; nothing was trained")


def check_data(lineage: Lineage, data: TokenizedData, config: PipelineConfig) -> None:
    want = lineage.tags.get("data.fingerprint")
    if want == data.fingerprint:
        return
    paths = [s.path for s in config.data.sources] or [config.data.path] + ([config.data.eval_path] if config.data.eval_path else [])
    changed = _changed_sources(lineage, config)
    raise NotReproducible(
        f"data {', '.join(paths)}: no longer matches v{lineage.version}'s data.fingerprint ({want}, now {data.fingerprint})"
        + (f"; changed: {'; '.join(changed)}" if changed else ": the file content, or how it is read (format, "
           "columns, template, max_length), changed") + ". Restore the data it was trained on; nothing was trained")


def _changed_sources(lineage: Lineage, config: PipelineConfig) -> list[str]:
    """Which sources of a mixture changed, from the per-source digests in the registered run's data report."""
    out = []
    for then, src in zip((lineage.data_report or {}).get("sources", []), config.data.sources):
        p = Path(src.path)
        if p.is_file() and (now := sha256_hex(p)) != then["digest"]:
            out.append(f"{src.path} sha256 {then['digest'][:12]}... is now {now[:12]}...")
    return out


class Verdict(BaseModel):
    identical: bool
    registered_sha256: str
    new_sha256: str
    max_abs_diff: float | None = None  # over every tensor; None when the tensor names or shapes differ
    worst_tensor: str | None = None
    tensors: int = 0
    line: str = ""


def compare_adapter(lineage: Lineage, new_adapter_dir: str, download_to: str) -> Verdict:
    """The new adapter file against the registered version's (its logged ``peft/`` folder)."""
    import mlflow
    import torch
    from safetensors.torch import load_file

    mlflow.set_tracking_uri(lineage.run.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{lineage.name}/{lineage.version}", dst_path=download_to))
    old_file, new_file = local / "peft" / ADAPTER, Path(new_adapter_dir) / ADAPTER
    if not old_file.is_file():
        raise UserError(f"models:/{lineage.name}/{lineage.version} holds no PEFT adapter (peft/{ADAPTER}) to compare "
                        "with; reproduce the adapter version, not a merged one")
    old_sha, new_sha = sha256_hex(old_file), sha256_hex(new_file)
    old, new = load_file(str(old_file)), load_file(str(new_file))
    diff, worst = None, None
    if old.keys() == new.keys() and all(old[k].shape == new[k].shape for k in old):
        per = {k: float((old[k].to(torch.float64) - new[k].to(torch.float64)).abs().max()) if old[k].numel() else 0.0 for k in old}
        worst = max(per, key=per.get) if per else None
        diff = per[worst] if worst else 0.0
    same_tensors = diff == 0.0 and all(old[k].dtype == new[k].dtype for k in old)
    identical = old_sha == new_sha or same_tensors
    what = (f"sha256 {new_sha[:16]}... {'=' if old_sha == new_sha else '!='} registered {old_sha[:16]}...; "
            f"max abs difference {'n/a (tensor names or shapes differ)' if diff is None else f'{diff:.3g}'} over {len(old)} tensors"
            + (f" (largest in {worst})" if diff else ""))
    line = f"{'identical' if identical else 'different'}: {lineage.name} v{lineage.version} rebuilt, {what}"
    return Verdict(identical=identical, registered_sha256=old_sha, new_sha256=new_sha, max_abs_diff=diff,
                   worst_tensor=worst, tensors=len(old), line=line)


def sha256_hex(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
