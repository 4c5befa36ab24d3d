"""``qlora`` command line: run the flow, validate data, predict from the registry, list/promote/rollback versions,
the events bridge and the notification automations, build the demo base.

User errors (bad config, bad data, missing model) print one line per problem and exit 1, with no
traceback; anything else is a bug or a fault and keeps its traceback. Exit codes are ``EXIT_CODES``
(printed by ``qlora --help``); each means one thing in every command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from flows.ephemeral import start_ephemeral_prefect_server as _start_ephemeral_prefect_server

# One meaning per code, so a script or a retry policy can branch on it. 2 is argparse's (a usage error) and
# nothing else; a fault worth retrying takes sysexits' EX_TEMPFAIL.
EXIT_OK, EXIT_USER, EXIT_USAGE, EXIT_DIFFERS, EXIT_REFUSED, EXIT_TRY_AGAIN = 0, 1, 2, 3, 4, 75
EXIT_CODES = {
    EXIT_OK: "success (reproduce: the rebuilt adapter is identical)",
    EXIT_USER: "bad input (config, data, model, model URI, registry name), or a promotion another one overtook; "
               "the message says what to do",
    EXIT_USAGE: "bad command line (unknown option, missing argument)",
    EXIT_DIFFERS: "reproduce: rebuilt, but the adapter differs from the registered one",
    EXIT_REFUSED: "reproduce: refused, the base or data no longer match the version's fingerprints; nothing trained",
    EXIT_TRY_AGAIN: "the tracking server did not answer; what finished is kept, re-run the same command",
}


class _UserErrorsWithoutTraceback(logging.Filter):
    """A UserError is the user's input, not our bug: Prefect logs its message, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from qlora.errors import UserError

        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


def _setup_logging() -> None:
    # Plain-function logs (logger "qlora.*") also show up in the Prefect task run logs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "qlora")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network for telemetry
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "alembic", "mlflow.store.db.utils", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for engine in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(engine).addFilter(_UserErrorsWithoutTraceback())


def _flows(module: str):
    """Import a flow module while Prefect's temporary server (if one is needed) starts, then wait for it."""
    import importlib

    server = _start_ephemeral_prefect_server()
    flows = importlib.import_module(module)
    if server is not None:
        import datasets  # noqa: E401,F401  (what the tasks import first)

        t = time.perf_counter()
        server.join()  # the flow must not see a server that is still starting
        if server.up_s is not None:
            logging.getLogger("qlora.cli").info(
                "Prefect temporary server up in %.1f s, %.1f s of it not hidden by imports", server.up_s, time.perf_counter() - t)
    return flows


def cmd_run(args) -> int:
    from qlora.config.files import load_config

    cfg = load_config(args.config, args.set)  # bad config: fail before starting anything
    version = _flows("flows.finetune").qlora_finetune(config=cfg)
    print(f"registered {version.name} version {version.version} aliases={','.join(version.aliases)}")
    return 0


def cmd_sweep(args) -> int:
    from flows.sweep_plan import grid_trials, markdown, parse_grid, sweep_config
    from qlora.config.files import load_config

    cfg = load_config(args.config, args.set)
    sweep = sweep_config(grid=parse_grid(args.grid), max_parallel=args.max_parallel, sampler=args.sampler,
                         trials=args.trials, trial_deployment=args.trial_deployment)
    if sweep.sampler == "grid":
        grid_trials(cfg, sweep)  # every trial's config checked before any server starts
    else:
        from flows.sweep_plan import TpeSearch

        TpeSearch(cfg, sweep)  # Optuna installed, every value valid
    result = _flows("flows.sweep").qlora_sweep(config=cfg, sweep=sweep)
    v = result.version
    print(markdown(result.rows))
    print(f"best trial {result.best_trial} by {result.metric}: registered {v.name} version {v.version} aliases={','.join(v.aliases)}")
    return 0


def cmd_reproduce(args) -> int:
    """Exit 0 when the rebuilt adapter is identical to the registered one, 3 when it differs, 4 when the base or
    data no longer match the version's fingerprints (refused before training)."""
    from registry.rebuild import NotReproducible

    try:
        verdict = _flows("flows.reproduce").qlora_reproduce(model_uri=args.model_uri, workdir=args.workdir,
                                                             tracking_uri=args.tracking_uri)
    except NotReproducible as e:
        print(f"error: {e}", file=sys.stderr)  # one line, as every user error; exit 4 says "refused"
        return EXIT_REFUSED
    print(verdict.line)
    return EXIT_OK if verdict.identical else EXIT_DIFFERS


def cmd_validate_data(args) -> int:
    """Validation and tokenization only (tokenizer, no model, writes nothing); prints the data report."""
    from qlora.config.files import load_config
    from qlora.models import check_context, load_tokenizer
    from tasks.data.pipeline import prepare_data, validate_data

    cfg = load_config(args.config, args.set)
    import datasets

    datasets.disable_progress_bars()  # the report is the output; bars would interleave with it
    parsed = validate_data(cfg.data)  # file and row structure first: needs no tokenizer
    tok = load_tokenizer(cfg.model)
    check_context(cfg.data.max_length, cfg.model)
    print(prepare_data(cfg.data, tok, parsed).report.markdown())
    return 0


@contextlib.contextmanager
def _registry_errors(what: str):
    """MLflow's answer to a name, version or URI that does not exist is the user's to fix: one line, exit 1.
    A tracking server that does not answer is a fault: exit 75, try again."""
    import mlflow

    from qlora.errors import TrackingUnavailable, UserError, is_transient

    try:
        yield
    except mlflow.exceptions.MlflowException as e:
        first = str(e).strip().splitlines()[0][:300]
        if is_transient(e):
            raise TrackingUnavailable(f"{what}: the tracking server did not answer ({first}); try again") from None
        raise UserError(f"{what}: {first} (see `qlora registry list NAME`; model URIs look like "
                        "models:/NAME@champion or models:/NAME/VERSION)") from None


def read_conversation(path: str) -> list[dict]:
    """A conversation file for ``qlora predict --messages``: ``{"messages": [...]}`` or the list of turns itself."""
    import json

    from qlora.errors import UserError

    try:
        got = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--messages {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--messages {path}: not JSON ({e})") from None
    got = got.get("messages") if isinstance(got, dict) else got
    if not isinstance(got, list) or not got:
        raise UserError(f'--messages {path}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} or that list')
    return got


def cmd_predict(args) -> int:
    import mlflow

    from qlora.errors import UserError
    from registry.consumer import predict
    from registry.trust import check_loadable

    with _registry_errors(args.model_uri):
        if args.tracking_uri:
            mlflow.set_tracking_uri(args.tracking_uri)
        inputs = list(args.prompts) + ([read_conversation(args.messages)] if args.messages else [])
        if not inputs:
            raise UserError("qlora predict: give a prompt, or a conversation with --messages FILE.json")
        check_loadable(args.model_uri)  # no remote code, no pickles: refused before anything is loaded
        outs = predict(args.model_uri, inputs, args.max_new_tokens, args.temperature, args.tracking_uri,
                       system=args.system, top_p=args.top_p, top_k=args.top_k,
                       repetition_penalty=args.repetition_penalty, stop=args.stop)
    for out in outs:
        print(out)
    return 0


def _registry_client(args):
    import mlflow

    from qlora.config.schema import TrackingConfig
    from qlora.errors import UserError
    from qlora.tracking.names import model_name_problem
    from qlora.tracking.runs import resolve_uri

    if (problem := model_name_problem(args.name)) is not None:
        raise UserError(f"{args.name!r}: not a registered model name: {problem}")
    return mlflow.MlflowClient(resolve_uri(TrackingConfig(uri=args.tracking_uri)))


def cmd_registry_list(args) -> int:
    from registry.aliases import list_lines

    with _registry_errors(args.name):
        print("\n".join(list_lines(_registry_client(args), args.name)))
    return 0


def cmd_promote(args) -> int:
    from registry.aliases import promote

    with _registry_errors(args.name):
        v = promote(_registry_client(args), args.name, args.version, args.why, args.by)
    if v != str(args.version):
        print(f"{args.name}: v{args.version} recorded as promoted, but a promotion of v{v} landed after it and "
              f"holds champion (see `qlora registry list {args.name}`)", file=sys.stderr)
        return EXIT_USER
    print(f"{args.name}: champion -> v{v}")
    return 0


def cmd_rollback(args) -> int:
    from registry.aliases import rollback

    with _registry_errors(args.name):
        frm, to = rollback(_registry_client(args), args.name, args.why, args.by)
    print(f"{args.name}: champion v{frm} -> v{to}")
    return 0


def cmd_batch_predict(args) -> int:
    from registry.batch import read_prompts

    read_prompts(args.input)  # a bad input file fails before any server starts or model loads
    with _registry_errors(args.model_uri):
        r = _flows("flows.batch_predict").qlora_batch_predict(
            model_uri=args.model_uri, input=args.input, output=args.output, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, tracking_uri=args.tracking_uri)
    print(f"{r.rows} predictions by {r.name} v{r.version} in {r.output} ({r.generated} generated now)")
    return 0


def cmd_bundle(args) -> int:
    with _registry_errors(args.model_uri):
        path = _flows("flows.bundle").qlora_serving_bundle(model_uri=args.model_uri, out=args.out,
                                                           tracking_uri=args.tracking_uri)
    print(f"bundle manifest {path}")
    return 0


def cmd_serve_check(args) -> int:
    from registry.bundle import serve_check

    m = serve_check(args.bundle, args.base, args.max_lora_rank, args.revision)
    print(f"ok: {m['model']['uri']} (rank {m['lora']['rank']}) on {args.base}; vllm: --lora-modules {m['vllm']['lora_modules']}")
    return 0


def cmd_events_serve(args) -> int:
    from flows.events import serve, webhook_secret

    serve(args.host, args.port, webhook_secret(args.secret_block), args.state_dir, args.max_body,
          set(args.model) or None)
    return 0


def cmd_events_register(args) -> int:
    from flows.events import register, webhook_secret

    with _registry_errors(args.name):
        print(register(args.tracking_uri, args.name, args.bridge_url, webhook_secret(args.secret_block)))
    return 0


def cmd_notifications_setup(args) -> int:
    from flows.notifications import setup

    print("\n".join(setup(args.block)))
    return 0


def cmd_build_demo(args) -> int:
    from demo.build import build_demo_base

    out = build_demo_base(args.out, args.data)
    print(f"demo base model written to {out}")
    return 0


def _version() -> str:
    """The installed distribution's version; a checkout run without installing says so."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qlora-pipeline")
    except PackageNotFoundError:
        return "(not installed: run `make install`)"


def build_parser() -> argparse.ArgumentParser:
    from demo.build import DEMO_DATA
    from qlora.config.schema import DEMO_BASE_DIR

    p = argparse.ArgumentParser(prog="qlora", description="Prefect-orchestrated QLoRA fine-tuning.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit codes:\n" + "\n".join(f"  {c:<3} {what}" for c, what in EXIT_CODES.items()))
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the fine-tuning flow on a config")
    r.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=5 (repeatable)")
    r.set_defaults(func=cmd_run)

    sw = sub.add_parser("sweep", help="one trial per grid point (each its own flow run), register only the best")
    sw.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="values to try for a config key, e.g. --grid lora.r=16,64 (repeatable: every combination runs)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    sw.add_argument("--max-parallel", type=int, default=1, help="trials in flight at once (default 1)")
    sw.add_argument("--sampler", choices=["grid", "tpe"], default="grid", help="tpe: Optuna picks --trials combinations")
    sw.add_argument("--trials", type=int, default=None, help="trials for --sampler tpe")
    sw.add_argument("--trial-deployment", default=None, metavar="FLOW/DEPLOYMENT",
                    help="run trials on a work pool via this deployment (e.g. qlora-trial/trial; needs PREFECT_API_URL)")
    sw.set_defaults(func=cmd_sweep)

    rp = sub.add_parser("reproduce", help="rebuild a registered version from its lineage, compare the adapters",
                        description="Rebuild a registered version from its lineage and compare the adapters. Exit 0: "
                        "identical; 3: rebuilt but different; 4: refused (base or data changed), nothing trained.")
    rp.add_argument("model_uri", help="models:/NAME/VERSION (or models:/NAME@ALIAS)")
    rp.add_argument("--workdir", default=None, help="a new folder to train in (default: <workdir>/reproduce/NAME-vN-<time>)")
    rp.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    rp.set_defaults(func=cmd_reproduce)

    v = sub.add_parser("validate-data", help="validate and tokenize the config's data, print the data report")
    v.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    v.set_defaults(func=cmd_validate_data)

    pr = sub.add_parser("predict", help="generate with a registered model, as a registry consumer would")
    pr.add_argument("model_uri", help="e.g. models:/qlora-demo@champion")
    pr.add_argument("prompts", nargs="*", help="user messages (for a chat model: each one user turn)")
    pr.add_argument("--messages", default=None, metavar="FILE.json",
                    help='a chat model: a conversation, {"messages": [{"role": ..., "content": ...}, ...]} ending with a '
                         "user turn; the reply to it is printed after those to the prompts")
    pr.add_argument("--system", default=None, metavar="TEXT",
                    help="a chat model: the system prompt for inputs without one (default: the one the training data "
                         "had throughout, if any)")
    pr.add_argument("--max-new-tokens", type=int, default=64)
    pr.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    pr.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --temperature > 0)")
    pr.add_argument("--top-k", type=int, default=None, help="top-k sampling (with --temperature > 0)")
    pr.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (default 1: none)")
    pr.add_argument("--stop", default=None, metavar="TEXT", help="stop once this text is generated (it is kept)")
    pr.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    pr.set_defaults(func=cmd_predict)

    tracking = argparse.ArgumentParser(add_help=False)
    tracking.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    reg = sub.add_parser("registry", help="inspect the model registry").add_subparsers(dest="registry_command", required=True)
    rl = reg.add_parser("list", parents=[tracking], help="versions, aliases, key metrics: a line each, newest first")
    rl.add_argument("name")
    rl.set_defaults(func=cmd_registry_list)
    po = sub.add_parser("promote", parents=[tracking], help="move champion to VERSION by hand (who/why recorded)")
    po.add_argument("name")
    po.add_argument("version")
    po.add_argument("--why", required=True, help="recorded in the version's tags")
    po.add_argument("--by", default=None, help="who decides (default: the OS user)")
    po.set_defaults(func=cmd_promote)
    rb = sub.add_parser("rollback", parents=[tracking], help="move champion back to the previous champion")
    rb.add_argument("name")
    rb.add_argument("--why", default="rollback", help="recorded in the versions' tags")
    rb.add_argument("--by", default=None)
    rb.set_defaults(func=cmd_rollback)

    bp = sub.add_parser("batch-predict", parents=[tracking], help="generate for every row of a file with one registered version")
    bp.add_argument("model_uri", help="models:/NAME@ALIAS (resolved once) or models:/NAME/VERSION")
    bp.add_argument("input", help=".jsonl, .csv or .parquet of user messages (column prompt/message/input/text)")
    bp.add_argument("output", help="predictions .jsonl ({name}, {version} filled in); an existing one is resumed")
    bp.add_argument("--batch-size", type=int, default=16)
    bp.add_argument("--max-new-tokens", type=int, default=64)
    bp.set_defaults(func=cmd_batch_predict)

    bu = sub.add_parser("bundle", parents=[tracking], help="lay a registered version out for vLLM multi-LoRA serving")
    bu.add_argument("model_uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    bu.add_argument("out", help="bundle folder ({name}, {version} filled in)")
    bu.set_defaults(func=cmd_bundle)
    sc = sub.add_parser("serve-check", help="refuse a bundle whose base, revision or rank does not match the server's")
    sc.add_argument("bundle", help="a folder `qlora bundle` (or the serving-bundle flow) wrote")
    sc.add_argument("--base", required=True, help="the server's --model (hub id or path)")
    sc.add_argument("--revision", default=None, help="the server's --revision (commit); for a local base, its fingerprint")
    sc.add_argument("--max-lora-rank", type=int, required=True, help="the server's --max-lora-rank")
    sc.set_defaults(func=cmd_serve_check)

    ev = sub.add_parser("events", help="the bridge from MLflow webhooks to Prefect events").add_subparsers(
        dest="events_command", required=True)
    secret = argparse.ArgumentParser(add_help=False)
    secret.add_argument("--secret-block", default=None, metavar="NAME",
                        help="Prefect Secret block holding the webhook secret (default: $QLORA_WEBHOOK_SECRET)")
    es = ev.add_parser("serve", parents=[secret], help="receive signed MLflow webhooks, emit Prefect events (PREFECT_API_URL)")
    es.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else needs TLS in front)")
    es.add_argument("--port", type=int, default=8765)
    es.add_argument("--state-dir", default=".qlora/events", help="where accepted delivery ids are kept (replays refused across restarts)")
    es.add_argument("--max-body", type=int, default=64 * 1024, help="largest body accepted, bytes (default 64 KiB)")
    es.add_argument("--model", action="append", default=[], help="forward only this registered model (repeatable; default all)")
    es.set_defaults(func=cmd_events_serve)
    er = ev.add_parser("register", parents=[secret, tracking], help="create or update the MLflow webhook of a model to the bridge")
    er.add_argument("name", help="registered model name")
    er.add_argument("--bridge-url", default="http://127.0.0.1:8765", help="where the bridge listens, as MLflow reaches it")
    er.set_defaults(func=cmd_events_register)

    no = sub.add_parser("notifications", help="Prefect automations that tell people of failed runs and champion moves")
    ns = no.add_subparsers(dest="notifications_command", required=True).add_parser(
        "setup", help="create or update the two automations on the Prefect server (PREFECT_API_URL); idempotent",
        description="Create or update, on the Prefect server PREFECT_API_URL names, the automations that send a "
        "message through a notification block when a flow run of this project fails, crashes or times out, and when "
        "a model's champion alias moves. Running it again updates them in place.")
    ns.add_argument("--block", required=True, metavar="TYPE/NAME",
                    help="an existing Prefect notification block, e.g. slack-webhook/ml-team (`prefect block ls`)")
    ns.set_defaults(func=cmd_notifications_setup)

    b = sub.add_parser("build-demo", help="build the tiny demo base model (random weights, trained tokenizer)")
    b.add_argument("--out", default=DEMO_BASE_DIR)
    b.add_argument("--data", default=str(DEMO_DATA))
    b.set_defaults(func=cmd_build_demo)
    return p


def _lighten_interpreter_teardown() -> None:
    """At exit Python garbage-collects, several times over, every object that torch, transformers,
    MLflow and Prefect created: 2.8 s after a ``qlora run`` had finished its work, here. One collection
    now (cyclic garbage is still finalized) and freezing what survives leaves teardown only the objects
    made after this point: 0.9 s in all. Only for a process about to exit, as frozen objects are never
    collected again. atexit handlers (Prefect's log and event workers, its temporary server, MLflow)
    run as before."""
    import gc

    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    from qlora.errors import TrackingUnavailable, UserError

    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER
    except TrackingUnavailable as e:  # a fault, not a bug: say what was kept and what to do
        print(f"error: {e}", file=sys.stderr)
        return EXIT_TRY_AGAIN


def entry() -> None:
    """The ``qlora`` command (and ``python -m flows.cli``): ``main`` in a process that ends with it."""
    code = main()
    _lighten_interpreter_teardown()  # not in main(): callers that go on (tests, notebooks) keep a normal GC
    sys.exit(code)


if __name__ == "__main__":
    entry()
