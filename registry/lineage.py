"""What every registered version says about where it came from: tags (searchable) and a Markdown description.

Built from what is on disk and in the MLflow run, not from what the config asked for: the quantization
config is read from the pre-quantized checkpoint's config.json and the LoRA config from the adapter's
adapter_config.json, so the tags describe the artifacts a consumer actually loads.
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path

from qlora.refs import Adapter, EvalReport, MlflowRun, QuantizedModel

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "mlflow", "prefect")
REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """HEAD of the project checkout, with ``-dirty`` when tracked files changed; None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    out = {}
    for p in LIBRARIES:
        try:
            out[p] = pkg_version(p)
        except PackageNotFoundError:
            pass
    return out


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# A package's canonical name -> (its version, its Requires-Dist lines): what installed metadata says.
Environment = dict[str, tuple[str, list[str]]]

# pip's own tooling and this project are never in the lock.
_NOT_LOCKED = {"torch", "pip", "setuptools", "wheel", "distribute", "qlora-pipeline"}


def installed_environment() -> Environment:
    """The environment's site-packages only, not all of sys.path: torch.compile (inductor) appends setuptools'
    _vendor folder, whose vendored packaging/wheel/zipp metadata would shadow the installed versions."""
    import site
    from importlib.metadata import distributions

    return {_canonical(d.metadata["Name"]): (d.version, d.requires or []) for d in distributions(path=site.getsitepackages())}


def read_lock(path: Path = REPO / "requirements.lock") -> dict[str, str] | None:
    if not path.is_file():
        return None
    return {_canonical(k): v for k, v in (line.split("==", 1) for line in path.read_text().splitlines()
                                          if line and not line.startswith("#"))}


def closure(env: Environment, roots: list[str]) -> set[str]:
    """Canonical names reachable from ``roots`` (requirement strings) through installed metadata, with markers
    evaluated here and extras followed; a package that is not installed is named but ends the walk."""
    from packaging.requirements import InvalidRequirement, Requirement

    seen: set[tuple[str, frozenset[str]]] = set()  # a package again with other extras adds their requirements
    todo = list(roots)
    while todo:
        try:
            req = Requirement(todo.pop())
        except InvalidRequirement:
            continue
        name, extras = _canonical(req.name), frozenset(req.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        if name not in env:
            continue
        for line in env[name][1]:
            try:
                marker = Requirement(line).marker
            except InvalidRequirement:
                continue
            if marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append(line.split(";")[0])
    return {name for name, _ in seen}


def torch_closure(env: Environment, *, build_only: bool = False) -> set[str]:
    """What torch's installed metadata pulls in, transitively: the CPU build's handful (sympy, networkx, ...) or
    the CUDA build's ~20 more (nvidia-*, cuda-*, triton). The lock is made on one build and used on either, so
    these are torch's: its exact pin fixes them.

    ``build_only``: only what torch's marker-conditioned requirements add (``platform_system == "Linux"``
    on the index's CUDA build; nothing on the CPU build), the part that differs between builds and that
    ``make lock`` leaves out."""
    from packaging.requirements import Requirement

    if "torch" not in env:
        return set()
    everything = closure(env, ["torch"]) - {"torch"}
    if not build_only:
        return everything
    return everything - closure(env, [line for line in env["torch"][1] if Requirement(line).marker is None])


def lock_differences(locked: dict[str, str], env: Environment) -> list[str]:
    """One line per package whose installed version is not the lock's. Accepted: a package the lock does not
    name that torch's own closure holds (the CUDA build's nvidia-*, cuda-*, triton), and a locked package
    left out because it serves only an extra that was not installed (a worker without dev, bench, sweep;
    known when this project is installed, so its metadata says which requirements are extras)."""
    torchs = torch_closure(env)
    needed = closure(env, ["qlora-pipeline", "torch"]) if "qlora-pipeline" in env else locked.keys()
    installed = {k: v for k, (v, _) in env.items()}
    return sorted(f"{k}: locked {locked.get(k)}, installed {installed.get(k)}" for k in locked.keys() | installed.keys()
                  if k not in _NOT_LOCKED and locked.get(k) != installed.get(k)
                  and not (k not in locked and k in torchs) and not (k not in installed and k not in needed))


def install_is_locked() -> bool | None:
    """Whether the installed packages are exactly ``requirements.lock`` (what ``make install`` installs) plus
    torch's own closure, whichever build; None without a lock file (an installed wheel, not a checkout)."""
    locked = read_lock()
    return None if locked is None else not lock_differences(locked, installed_environment())


def prefect_ui_url(flow_run_id: str | None) -> str | None:
    """Link to the flow run in the Prefect UI, when a server (not the ephemeral API) is configured."""
    if not flow_run_id:
        return None
    try:
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

        ui = PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/api") or None
    except Exception:  # settings unreadable: lineage must never fail a registration
        ui = None
    ui = ui or os.environ.get("PREFECT_UI_URL")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def _json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def lineage_tags(base: QuantizedModel, adapter: Adapter, report: EvalReport, run: MlflowRun,
                 run_tags: dict[str, str]) -> dict[str, str]:
    """Flat string tags (MLflow tag values are strings; long JSON is fine, 8k chars max)."""
    quant = _json_file(Path(base.path) / "config.json").get("quantization_config", {})
    lora = _json_file(Path(adapter.path) / "adapter_config.json")
    lora = {k: lora.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type")}
    flow_run_id = run_tags.get("prefect.flow_run_id")
    tags = {
        "base.name_or_path": base.base,
        "base.revision": base.revision or "",
        "base.hub_id": base.hub_id or "",
        "base.commit": base.commit or "",  # what the revision resolved to: consumers load the base at this commit
        "base.fingerprint": base.fingerprint,  # content key: local weights hash or hub id+revision, + quant config
        "base.quantized_path": base.path,
        "quantization": json.dumps(quant, sort_keys=True, default=str),
        "quantization.compute_dtype_choice": base.dtype_choice or "",
        "lora": json.dumps(lora, sort_keys=True, default=str),
        "config_hash": run_tags.get("config_hash", ""),
        "git_commit": git_commit() or "unknown",
        "libraries": json.dumps(library_versions(), sort_keys=True),
        "libraries.locked": {True: "true", False: "false", None: "no lock file"}[install_is_locked()],
        "prefect.flow_run_id": flow_run_id or "",
        "mlflow_run_id": run.run_id,
        "train.global_step": str(adapter.global_step),
        "train.loss": f"{adapter.train_loss:.6g}",
        "train.optim": adapter.optim or "",  # train.optim as resolved (auto: by device and adapter size)
    }
    if adapter.selected_by:  # generation eval during training chose this checkpoint (train.select_checkpoint)
        value = "" if adapter.selected_value is None else f"{adapter.selected_value:.6g}"
        tags |= {"checkpoint.step": str(adapter.selected_step), "checkpoint.selected_by": adapter.selected_by,
                 "checkpoint.metric": adapter.selected_metric or "", "checkpoint.value": value,
                 "checkpoint.model_id": adapter.checkpoint_model_id or "",
                 "checkpoint.evaluations": json.dumps(adapter.evaluations)}
    if report.data is not None:
        tags |= {"data.fingerprint": report.data.fingerprint, "data.train_rows": str(report.data.train_rows),
                 "data.eval_rows": str(report.data.eval_rows), "data.truncated_rows": str(report.data.truncated_rows)}
        chat = report.data.chat
        tags["consumer.contract"] = "conversation" if chat is not None else "prompt"
        if chat is not None and chat.system is not None:
            tags["consumer.system_prompt"] = chat.system
    if url := prefect_ui_url(flow_run_id):
        tags["prefect.flow_run_url"] = url
    tags |= {k: f"{v:.6g}" for k, v in report.metrics.items()}
    return {k: v for k, v in tags.items() if v != ""}


def eval_table(metrics: dict[str, float]) -> str:
    names = sorted({k.split("/")[-1] for k in metrics if k.startswith("eval/")})
    rows = ["| metric | base | tuned |", "|---|---|---|"]
    for m in names:
        b, t = metrics.get(f"eval/base/{m}"), metrics.get(f"eval/tuned/{m}")
        rows.append(f"| {m} | {'' if b is None else f'{b:.4g}'} | {'' if t is None else f'{t:.4g}'} |")
    return "\n".join(rows)


def consumer_contract(report: EvalReport) -> str:
    """What consumers send, in words, with the system prompt they get when they send none."""
    chat = report.data.chat if report.data is not None else None
    if chat is None:
        return "Consumers send the bare user message; the training prompt template is applied to it."
    text = ('Consumers send a conversation, `{"messages": [{"role": ..., "content": ...}, ...]}` ending with a user '
            "turn, and get the assistant's reply; it is rendered by the training chat template"
            + (f" with `{chat.kwargs}`" if chat.kwargs else "") + ". A bare string (`qlora predict`, "
            "`registry.consumer.predict`) is one user turn. ")
    if chat.system is not None:
        return text + (f"Every training row had the system prompt `{chat.system}`: it is applied to a conversation "
                       "that brings no system turn.")
    if chat.systems:
        return text + (f"The training rows' system prompts vary ({chat.systems} distinct, {chat.rows_without_system} rows "
                       "without one): none is applied when a consumer sends none.")
    return text + "The training rows had no system turn; none is applied."


def base_source(tags: dict[str, str]) -> str:
    """Where consumers get the base, in words: the hub at the recorded commit, the local copy only as a fallback."""
    local = tags.get("base.quantized_path")
    if tags.get("base.hub_id") and tags.get("base.commit"):
        return (f"- base: `{tags['base.hub_id']}` at commit `{tags['base.commit']}` (revision `{tags.get('base.revision', 'main')}`): "
                "`qlora predict` and `registry.consumer.load` load it from the hub at that commit and quantize it as recorded; "
                f"the pre-quantized copy `{local}` is only the fallback when the hub is unreachable (and what a bare "
                "`mlflow.pyfunc.load_model` reads: MLflow references a PEFT base as a local folder)\n")
    return (f"- base: local `{tags.get('base.name_or_path')}` (no hub id): consumers load the pre-quantized copy `{local}`, "
            "so they need it on the same machine or shared storage\n")


def description(name: str, version: str, tags: dict[str, str], report: EvalReport, decision) -> str:
    """Markdown shown on the version's page in the MLflow UI."""
    evidence = ""
    if decision.n:
        evidence = (f"\n\n| against | n | mean diff | {decision.level:.0%} CI | resamples |\n|---|---|---|---|---|\n"
                    f"| {decision.against} | {decision.n} | {decision.mean_diff:+.3f} | "
                    f"[{decision.ci_low:+.3f}, {decision.ci_high:+.3f}] | {decision.resamples} |")
    data = ""
    if report.data is not None:
        data = (f"- data: fingerprint `{report.data.fingerprint}`, {report.data.train_rows} train / "
                f"{report.data.eval_rows} eval rows ({report.data.truncated_rows} truncated)\n")
    link = f" ([Prefect UI]({tags['prefect.flow_run_url']}))" if "prefect.flow_run_url" in tags else ""
    return (
        f"## {name} v{version}: QLoRA adapter\n\n"
        f"{base_source(tags)}- base fingerprint `{tags.get('base.fingerprint')}`\n"
        f"- quantization: `{tags.get('quantization')}`\n- LoRA: `{tags.get('lora')}`\n{data}"
        f"- config hash `{tags.get('config_hash', '-')}`, git `{tags.get('git_commit')}`\n"
        f"- Prefect flow run `{tags.get('prefect.flow_run_id', '-')}`{link}, MLflow run `{tags['mlflow_run_id']}`\n"
        f"- libraries: `{tags.get('libraries')}`\n\n"
        f"### Consumers\n\n{consumer_contract(report)}\n\n"
        f"### Evaluation (greedy, same held-out eval set for base and tuned)\n\n{eval_table(report.metrics)}\n\n"
        f"### Promotion (gate metric: {decision.metric})\n\n**{'promoted to champion' if decision.promote else 'kept as challenger'}**: "
        f"{decision.reason}{evidence}\n"
    )
