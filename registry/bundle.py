"""A serving bundle for vLLM's multi-LoRA serving, and the check that a server may load it.

``write_bundle`` lays a registered version out as vLLM expects (``--enable-lora --lora-modules NAME=PATH``)::

    BUNDLE/manifest.json                       base id + resolved revision, rank, target modules, template hashes, version
    BUNDLE/adapters/<name>-v<version>/         adapter_config.json + adapter_model.safetensors (safetensors only)

``serve_check`` compares a bundle with what a server runs (``--model``, ``--revision``, ``--max-lora-rank``) and
lists every mismatch. vLLM itself loads an adapter trained on another base without complaint and serves garbage
(vllm-project/vllm#12106), so this is the check that stops it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from qlora.errors import UserError

MANIFEST = "manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class BundleMismatch(UserError):
    """A bundle a server must not load: another base, another revision, or a rank above the server's limit."""


def _sha256(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text else None


def _chat_template(tokenizer_dir: Path) -> str | None:
    jinja = tokenizer_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = tokenizer_dir / "tokenizer_config.json"
    tpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") if cfg.is_file() else None
    return tpl if isinstance(tpl, str) else (json.dumps(tpl, sort_keys=True) if tpl else None)


def write_bundle(client, name: str, version: str, out: Path | str) -> Path:
    """Write (or rewrite) the bundle of ``models:/name/version`` under ``out``; returns the manifest's path."""
    import mlflow
    from mlflow.models import Model

    mv = client.get_model_version(name, version)
    tags = mv.tags
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="qlora-bundle-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp))
        peft = local / "peft"
        missing = [f for f in ADAPTER_FILES if not (peft / f).is_file()]
        if missing:
            raise UserError(f"models:/{name}/{version}: no {', '.join(missing)} under peft/ in the logged model; "
                            "only versions registered by this pipeline (a PEFT adapter) can be bundled")
        spec = Model.load(str(local))
        base = (spec.metadata or {}).get("qlora_base") or {}
        flavor = spec.flavors.get("transformers", {})
        adapter_cfg = json.loads((peft / "adapter_config.json").read_text(encoding="utf-8"))
        base_id = base.get("hub_id") or tags.get("base.hub_id") or tags.get("base.name_or_path")
        # A hub base is pinned by its commit; a local one by the content fingerprint of its weights.
        revision = base.get("commit") or tags.get("base.commit") or tags.get("base.fingerprint")
        module = f"{name}-v{version}"
        dest = out / "adapters" / module
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        shutil.copy2(peft / "adapter_model.safetensors", dest / "adapter_model.safetensors")
        # vLLM reads the base from its own --model; the path recorded at training (a local quantized copy) would mislead.
        (dest / "adapter_config.json").write_text(json.dumps(adapter_cfg | {"base_model_name_or_path": base_id}, indent=2))
        ranks = [int(adapter_cfg.get("r") or 0), *map(int, (adapter_cfg.get("rank_pattern") or {}).values())]
        targets = adapter_cfg.get("target_modules")
        manifest = {
            "format": 1,
            "model": {"name": name, "version": str(version), "uri": f"models:/{name}/{version}", "run_id": mv.run_id},
            "base": {"id": base_id, "revision": revision, "hub": bool(base.get("hub_id") or tags.get("base.hub_id")),
                     "fingerprint": tags.get("base.fingerprint")},
            "lora": {"rank": max(ranks), "alpha": adapter_cfg.get("lora_alpha"),
                     "target_modules": sorted(targets) if isinstance(targets, list) else targets,
                     "module_name": module, "path": f"adapters/{module}"},
            "chat_template_sha256": _sha256(_chat_template(local / "components" / "tokenizer")),
            # the template the consumer wrapper applies (MLflow keeps it in the model's metadata); vLLM's chat endpoint
            # applies the base's chat template instead: a consumer of vLLM must send the same rendered prompt
            "prompt_template_sha256": _sha256((spec.metadata or {}).get("prompt_template") or flavor.get("prompt_template")),
            "vllm": {"lora_modules": f"{module}={(dest).resolve()}",
                     "serve": f"vllm serve {base_id}" + (f" --revision {revision}" if base.get("commit") else "")
                              + f" --enable-lora --max-lora-rank {max(ranks)} --lora-modules {module}={dest.resolve()}"},
        }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


def read_manifest(bundle: Path | str) -> dict:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: no bundle manifest; write one with `qlora bundle models:/NAME/VERSION {bundle}`")
    return json.loads(path.read_text(encoding="utf-8"))


def serve_check(bundle: Path | str, base: str, max_lora_rank: int, revision: str | None = None) -> dict:
    """The manifest when a server running ``base`` (at ``revision``) with ``--max-lora-rank max_lora_rank`` may load
    the bundle; ``BundleMismatch`` naming every mismatch otherwise."""
    bundle = Path(bundle)
    m = read_manifest(bundle)
    problems = []
    if m["base"]["id"] != base:
        problems.append(f"base: the adapter was trained on {m['base']['id']!r}, the server runs {base!r}")
    want = m["base"].get("revision")
    if want and revision is None:
        problems.append(f"revision: the adapter was trained on revision {want}; pass the server's --revision to confirm it")
    elif want and revision != want:
        problems.append(f"revision: the adapter was trained on {want}, the server runs {revision}")
    if m["lora"]["rank"] > max_lora_rank:
        problems.append(f"rank: the adapter's LoRA rank is {m['lora']['rank']}, above the server's --max-lora-rank "
                        f"{max_lora_rank} (start vLLM with --max-lora-rank {m['lora']['rank']} or more)")
    adapter = bundle / m["lora"]["path"]
    missing = [f for f in ADAPTER_FILES if not (adapter / f).is_file()]
    if missing:
        problems.append(f"files: {adapter} lacks {', '.join(missing)}")
    elif int(json.loads((adapter / "adapter_config.json").read_text()).get("r") or 0) > m["lora"]["rank"]:
        problems.append(f"files: {adapter}/adapter_config.json has a rank above the manifest's {m['lora']['rank']}")
    if problems:
        raise BundleMismatch(f"{bundle}: do not serve {m['model']['uri']} on this server:\n  " + "\n  ".join(problems))
    return m
