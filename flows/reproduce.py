"""The ``qlora-reproduce`` flow: rebuild a registered version from its lineage and compare the adapters.

Stages:
1. read-lineage    - the version, its run's config.json and lineage tags (``registry/rebuild.py``);
                     git commit / library differences are logged as warnings
2. quantize        - the base, into a fresh workdir; refused unless it matches base.fingerprint
3. tokenize        - the data, same; refused unless it matches data.fingerprint
4. train           - the same stage as ``qlora run``, in the fresh workdir (never the original run dir,
                     whose content-keyed adapter would otherwise simply be found and returned)
5. compare         - the new adapter against the registered one; a Prefect artifact with the verdict

Nothing is logged to MLflow or registered: the reproduction is a check, not a new version.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows import stages
from qlora.config.schema import TrackingConfig
from qlora.errors import UserError, retry_transient
from qlora.locks import device_slot
from qlora.tracking.runs import resolve_uri
from registry.rebuild import (
    Lineage,
    Verdict,
    check_base,
    check_data,
    compare_adapter,
    environment_differences,
    read_lineage,
    rebased,
)
from tasks.reporting import artifact_key

log = logging.getLogger("qlora.reproduce")
_common = dict(retry_condition_fn=retry_transient, retries=2, retry_delay_seconds=[2, 10])


@task(name="read-lineage", **_common)
def lineage_of(model_uri: str, tracking_uri: str) -> Lineage:
    return read_lineage(model_uri, tracking_uri)


@task(name="compare", **_common)
def compare(lineage: Lineage, adapter_dir: str) -> Verdict:
    with tempfile.TemporaryDirectory(prefix="qlora-registered-") as d:
        return compare_adapter(lineage, adapter_dir, d)


def fresh_workdir(workdir: str | None, lineage: Lineage) -> str:
    """A new folder: a workdir holding this run's adapter would hand it back instead of training it again."""
    if workdir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return str(Path(lineage.cwd or ".", lineage.config.workdir, "reproduce", f"{lineage.name}-v{lineage.version}-{stamp}").resolve())
    if Path(workdir).exists() and any(Path(workdir).iterdir()):
        raise UserError(f"--workdir {workdir}: not empty; reproduce into a new folder (one holding this run's adapter "
                        "would return it without training)")
    return str(Path(workdir).resolve())


@flow(name="qlora-reproduce", log_prints=True)
def qlora_reproduce(model_uri: str, workdir: str | None = None, tracking_uri: str | None = None) -> Verdict:
    """Rebuild ``model_uri`` (models:/NAME/VERSION) from its lineage alone and compare the new adapter with it."""
    lineage = lineage_of(model_uri, resolve_uri(TrackingConfig(uri=tracking_uri)))
    for warning in environment_differences(lineage):
        log.warning("%s (the adapter may differ for that reason)", warning)
    cfg = rebased(lineage.config, lineage.cwd).model_copy(update={"workdir": fresh_workdir(workdir, lineage)})
    log.info("rebuilding %s v%s in %s", lineage.name, lineage.version, cfg.workdir)
    base = stages.quantize(cfg.model, cfg.quantization, cfg.workdir, limit=cfg.timeouts.quantize)
    check_base(lineage, base)
    data = stages.tokenize(cfg.data, cfg.model, cfg.workdir, limit=cfg.timeouts.tokenize)
    check_data(lineage, data, cfg)
    with device_slot():
        adapter = stages.train(base, data, cfg.lora, cfg.train, cfg.workdir, limit=cfg.timeouts.train,
                               evaluation=cfg.eval, gate_choice=cfg.registry.gate_metric)
    verdict = compare(lineage, adapter.path)
    create_markdown_artifact(f"# Reproduce {model_uri}\n\n**{verdict.line}**\n\nRebuilt in `{cfg.workdir}`.",
                             key=artifact_key(lineage.name, f"v{lineage.version}-reproduce"), description=verdict.line[:200])
    return verdict
