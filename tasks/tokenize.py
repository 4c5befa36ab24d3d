"""Stage 1: validate and tokenize the dataset once per content, cached under a key made from content.

Order matters: everything here runs on CPU with the tokenizer only, before any model is loaded,
so bad data fails in seconds instead of after a GPU was allocated. The data path itself is in
``tasks/data/`` (read -> parse -> render -> encode -> drops -> split -> mix -> report, driven by
``tasks/data/pipeline.py``); this module decides whether it has to run at all, writes its result
atomically and logs the data report to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from qlora.config.schema import DataConfig, ModelConfig, stable_hash
from qlora.errors import UserError
from qlora.locks import one_writer
from qlora.models import check_context, load_tokenizer
from qlora.refs import MlflowRun, TokenizedData
from qlora.storage import cached, staged_dir
from qlora.template import PROMPT_TEMPLATE, chat_template_of, template_kwargs
from tasks.data.drops import refuse
from tasks.data.pipeline import Inputs, prepare_data, validate_data
from tasks.data.read import LocalContent, local_inputs
from tasks.data.report import DataReport

log = logging.getLogger("qlora.tokenize")


def tokenizer_fingerprint(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    body += str(tok.all_special_tokens) + str(getattr(tok, "chat_template", None))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def cache_key(data: DataConfig, tok, template: list, local: tuple[list[LocalContent | None], LocalContent | None],
              inputs: Inputs | None) -> str:
    """Content, not names: data bytes (or hub revision), tokenizer, template, length, format, mapping.
    The contents come from the inputs as parsed, or, when nothing had to be parsed yet, as read."""
    train = [p.src.digest for p in inputs.sources] if inputs else [c.digest for c in local[0]]
    evals = (inputs.eval.src.digest if inputs.eval else "") if inputs else (local[1].digest if local[1] else "")
    return stable_hash(
        {
            # A mixture: every source's content and how it is read and weighted; not its path (a moved file is the same data).
            "data": "mix:" + stable_hash([{"content": d, **s.model_dump(exclude={"path"})} for s, d in zip(data.sources, train)])
            if data.sources else train[0],
            "eval_data": evals,
            "tokenizer": tokenizer_fingerprint(tok),
            "template": template,
            # 2: eval split carries message/standalone; rows a template is not prefix-stable for are split per turn
            # 3: eval scores the last answer, carries its conversation; the manifest carries the chat contract
            "layout": 3,
            "max_length": data.max_length,
            "overlength": data.overlength,
            "format": data.format,
            "columns": data.columns,
            "split": [data.eval_fraction, data.seed, data.max_drop_fraction],
        }
    )


def tokenize_dataset(data: DataConfig, model: ModelConfig, workdir: str | Path, run: MlflowRun | None = None) -> TokenizedData:
    """Validate and tokenize ``data``; reuse the cached result when every input's content is unchanged.

    Every local input is read once: its digest for the key, its bytes for parsing. Then the tokenizer and what
    it renders with: a tokenizer that does not load is said after the data's own problems (``_inputs``); a
    base whose context is shorter than ``data.max_length`` at once, before anything is written."""
    local = local_inputs(data)
    try:
        tok, err = load_tokenizer(model), None
    except (OSError, ValueError, UserError) as e:
        tok, err = None, e
    else:
        check_context(data.max_length, model)
    template = [PROMPT_TEMPLATE, chat_template_of(tok, data.chat_template),
                template_kwargs(tok, data.chat_template, data.chat_template_kwargs)]
    with one_writer(workdir, "tokenized"):  # concurrent runs of one dataset: one writes it, the others wait, then hit
        return _tokenized(data, tok, err, template, local, Path(workdir) / "tokenized", run)


def _inputs(data: DataConfig, tok, err: Exception | None, local) -> Inputs | None:
    """The inputs parsed, where the cache key needs them first: a hub dataset's revision is known once loaded,
    and a tokenizer that failed (``err``) is said after the data's own problems. Warm re-runs of local data
    parse nothing: the same bytes were validated when the cache entry was written."""
    complete = None not in local[0] and (local[1] is not None or not data.eval_path)
    inputs = None if tok is not None and complete else validate_data(data, local)
    if err is not None:  # the data's own problems first: a bad row is said before a base that does not load
        for parsed in inputs.sources + ([inputs.eval] if inputs.eval else []):
            refuse(parsed.problems, parsed.rows_read, parsed.src.name, parsed.hint, data)
        raise err
    return inputs


def _tokenized(data: DataConfig, tok, err: Exception | None, template: list, local, cache: Path,
               run: MlflowRun | None) -> TokenizedData:
    from datasets import DatasetDict

    inputs = _inputs(data, tok, err, local)
    out = cache / cache_key(data, tok, template, local, inputs)
    hit = cached(out, "the tokenized dataset", TokenizedData)  # checked before it is trusted (qlora/storage.py)
    if hit is not None:
        log.info("tokenized data cache hit: %s (key %s), not re-tokenizing", out, out.name)
        log_report(DataReport.model_validate_json((out / "report.json").read_text()), run, cache_hit=True)
        log_inputs(hit, run)
        return hit

    prep = prepare_data(data, tok, inputs, local)
    r = prep.report
    ref = TokenizedData(
        path=str(out.resolve()), fingerprint=out.name, train_rows=len(prep.train), eval_rows=len(prep.eval),
        truncated_rows=r.truncated_rows, max_length=data.max_length, format=r.format, prompt_template=prep.prompt_template,
        report_path=str((out / "report.md").resolve()), chat=prep.chat,
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
    log_inputs(ref, run)
    return ref


def log_inputs(ref: TokenizedData, run: MlflowRun | None) -> None:
    """The training and eval splits as the run's dataset inputs (``mlflow.data``: name, source = the tokenized
    folder, digest = its content key), so MLflow's Datasets column shows what the run trained and was scored on."""
    from qlora.tracking.outage import logging_to

    with logging_to(run) as tracked:
        if tracked is None:
            return
        import mlflow
        from datasets import load_from_disk

        splits = load_from_disk(ref.path)
        # A split of token ids only (train keeps no text): MLflow cannot infer a schema for list columns and says
        # so with the whole column in the log (~20 lines); it logs the dataset without a schema either way.
        schema_log = logging.getLogger("mlflow.data.huggingface_dataset")
        for split, context in (("train", "training"), ("eval", "evaluation")):
            rows = splits[split]
            text = [c for c in ("prompt", "reference") if c in rows.column_names]  # the readable columns, when kept
            level = schema_log.level
            schema_log.setLevel(level if text else logging.ERROR)
            try:  # the schema is inferred when the input is logged
                ds = mlflow.data.from_huggingface(rows.select_columns(text) if text else rows, name=split, source=ref.path,
                                                  digest=f"{ref.fingerprint}-{split}",
                                                  targets="reference" if "reference" in text else None)
                mlflow.log_input(ds, context=context)
            finally:
                schema_log.setLevel(level)


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
