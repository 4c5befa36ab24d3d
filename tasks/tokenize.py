"""Stage 1: validate and tokenize the dataset once per content, cached under a key made from content.

Order matters: everything here runs on CPU with the tokenizer only, before any model is loaded,
so bad data fails in seconds instead of after a GPU was allocated. The data path itself is in
``tasks/data/`` (sources -> formats -> validate -> encode -> report); this module decides whether it
has to run at all, writes its result atomically and logs the data report to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from qlora.config.schema import DataConfig, ModelConfig, stable_hash
from qlora.errors import ConfigError, UserError
from qlora.models.loading import context_length, load_tokenizer
from qlora.refs import MlflowRun, TokenizedData
from qlora.storage import staged_dir
from qlora.template import PROMPT_TEMPLATE, chat_template_of, template_kwargs
from tasks.data.mixture import mixture_digest, parsed_digests, prepare_data, validate_data
from tasks.data.report import DataReport
from tasks.data.sources import local_content

log = logging.getLogger("qlora.tokenize")


def tokenizer_fingerprint(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    body += str(tok.all_special_tokens) + str(getattr(tok, "chat_template", None))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def cache_key(data: DataConfig, tok, fmt_hint: str, digests: tuple[str, str]) -> str:
    """Content, not names: data bytes (or hub revision), tokenizer, template, length, format, mapping."""
    return stable_hash(
        {
            "data": digests[0],
            "eval_data": digests[1],
            "tokenizer": tokenizer_fingerprint(tok),
            "template": [PROMPT_TEMPLATE, chat_template_of(tok, data.chat_template),
                         template_kwargs(tok, data.chat_template, data.chat_template_kwargs)],
            # 2: eval split carries message/standalone; rows a template is not prefix-stable for are split per turn
            "layout": 2,
            "max_length": data.max_length,
            "overlength": data.overlength,
            "format": fmt_hint,
            "columns": data.columns,
            "split": [data.eval_fraction, data.seed, data.max_drop_fraction],
        }
    )


def check_context(data: DataConfig, model: ModelConfig) -> None:
    """``data.max_length`` must fit the base's context: found here, with the tokenizer, not after training."""
    ctx = context_length(model)
    if ctx is not None and data.max_length > ctx:
        raise ConfigError(
            f"data.max_length={data.max_length} is more than the context of model.name_or_path={model.name_or_path} "
            f"({ctx} tokens, max_position_embeddings in its config.json): set data.max_length to at most {ctx}"
        )


def _cache_hit(out: Path, run: MlflowRun | None) -> TokenizedData | None:
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return None
    log.info("tokenized data cache hit: %s (key %s), not re-tokenizing", out, out.name)
    log_report(DataReport.model_validate_json((out / "report.json").read_text()), run, cache_hit=True)
    return TokenizedData.model_validate_json(manifest.read_text())


def _probe_cache(data: DataConfig, model: ModelConfig, workdir, run):
    """Warm re-runs: the same bytes were validated when the cache entry was written, so skip parsing them.

    Only for local data (a hub dataset's revision is known once loaded). A tokenizer that does not load
    is no hit: the full path then reports data problems first, before any tokenizer error.
    Returns (hit or None, the tokenizer if it loaded, the local contents read): a miss reuses both, so
    neither the tokenizer nor the data file is loaded twice.
    """
    sources = [(s.path, s.split) for s in data.sources] or [(data.path, data.split)]
    local = ([local_content(p, split) for p, split in sources], local_content(data.eval_path, data.split) if data.eval_path else None)
    if None in local[0] or (data.eval_path and local[1] is None):
        return None, None, local
    try:
        tok = load_tokenizer(model)
    except (OSError, ValueError, UserError):
        return None, None, local
    check_context(data, model)
    train = mixture_digest(data, [c.digest for c in local[0]]) if data.sources else local[0][0].digest
    digests = (train, local[1].digest if local[1] else "")
    return _cache_hit(Path(workdir) / "tokenized" / cache_key(data, tok, data.format, digests), run), tok, local


def tokenize_dataset(data: DataConfig, model: ModelConfig, workdir: str | Path, run: MlflowRun | None = None) -> TokenizedData:
    """Validate and tokenize ``data``; reuse the cached result when every input's content is unchanged."""
    from datasets import DatasetDict

    hit, tok, local = _probe_cache(data, model, workdir, run)
    if hit is not None:
        return hit
    parsed = validate_data(data, local)  # structure first: a broken file fails here, before any tokenizer or model
    if tok is None:
        tok = load_tokenizer(model)
        check_context(data, model)
    key = cache_key(data, tok, data.format, parsed_digests(data, parsed))
    out = Path(workdir) / "tokenized" / key
    hit = _cache_hit(out, run)
    if hit is not None:
        return hit

    prep = prepare_data(data, tok, parsed)
    r = prep.report
    ref = TokenizedData(
        path=str(out.resolve()), fingerprint=key, train_rows=len(prep.train), eval_rows=len(prep.eval),
        truncated_rows=r.truncated_rows, max_length=data.max_length, format=r.format, prompt_template=prep.prompt_template,
        report_path=str((out / "report.md").resolve()),
    )
    with staged_dir(out, "the tokenized dataset") as tmp:  # renamed into place only when complete
        DatasetDict({"train": prep.train, "eval": prep.eval}).save_to_disk(str(tmp))
        (tmp / "report.json").write_text(r.model_dump_json(indent=1))
        (tmp / "report.md").write_text(r.markdown())
        (tmp / "manifest.json").write_text(ref.model_dump_json())
    log.info(
        "tokenized %s (%s): %d train / %d eval rows, %d dropped, %d truncated to %d tokens -> %s",
        r.source, r.format, ref.train_rows, ref.eval_rows, r.rows_dropped, r.truncated_rows, data.max_length, out,
    )
    log_report(r, run, cache_hit=False)
    return ref


def log_report(report: DataReport, run: MlflowRun | None, cache_hit: bool) -> None:
    """The data report into the flow's MLflow run: metrics ``data/*`` plus report.md and report.json."""
    from qlora.tracking.outage import logging_to

    with logging_to(run) as tracked:  # a tracking outage costs the report in MLflow, not the stage
        if tracked is None:
            return
        import mlflow

        mlflow.log_metrics({**report.metrics(), "data/cache_hit": float(cache_hit)})
        mlflow.log_text(report.markdown(), "data/report.md")
        mlflow.log_dict(report.model_dump(mode="json"), "data/report.json")
