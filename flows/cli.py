"""The ``xai-audit`` command line.

Exit codes: 0 success; 2 bad usage or config (the message names the field path), or a configured
Prefect API that cannot be reached; 3 the run finished but some items failed (see the ``errors``
table); 1 anything unexpected; 128 + N when stopped by signal N (SIGTERM: 143), the run marked
failed so the next run of its config resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_ITEMS_FAILED = 0, 1, 2, 3
PACKAGE = Path(str(importlib.resources.files("xai_audit")))
"""The installed package's folder (a checkout's root): shipped configs and the deployment template live in it."""
DEPLOYMENTS = PACKAGE / "deployments" / "prefect.yaml"
SHIPPED_CONFIGS = PACKAGE / "configs"
DEMO = SHIPPED_CONFIGS / "demo.yaml"


def _quiet_offline_prefect() -> None:
    """Settings that keep an offline CLI run quiet and patient with Prefect's ephemeral API (user values win)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # the ephemeral API's 20 s default is too short on a busy machine (two runs starting at once)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _results_root(args: argparse.Namespace, config_results: str | None = None) -> str:
    return args.results or os.environ.get("XAI_AUDIT_RESULTS") or config_results or str(Path.cwd() / "results")


def _print_frame(frame, fmt: str, output: str | None) -> None:
    import pandas as pd

    if fmt == "parquet":
        if not output:
            raise _UsageError("--format parquet needs --output PATH")
        frame.to_parquet(output, index=False)
        print(f"wrote {len(frame)} rows to {output}")
        return
    if fmt == "csv":
        text = frame.to_csv(index=False)
    elif fmt == "json":
        text = frame.to_json(orient="records", date_format="iso", default_handler=str)
    else:
        with pd.option_context("display.max_rows", 200, "display.max_columns", 50, "display.width", 200):
            text = frame.to_string(index=False) if not frame.empty else "(no rows)"
    if output:
        Path(output).write_text(text)
    else:
        print(text, end="" if text.endswith("\n") else "\n")


class _UsageError(Exception):
    """Bad command-line usage (exit 2)."""


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM, SIGHUP): unwinds the run like Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


HEARTBEAT_S = 20.0  # a line at least this often while a run works, even inside one long step
HEARTBEAT = "still working (%.0f s since: %s)"


@contextlib.contextmanager
def _progress_to_stderr() -> Iterator[None]:
    """Show the ``tasks``/``flows`` loggers' INFO lines on stderr while a run works: each stage
    announcing itself and its size, progress of long loops (bars on a terminal), and, when a
    step runs long without a line, a heartbeat naming it."""
    import logging

    from xai_audit.tasks.core import progress

    last = {"time": time.monotonic(), "message": "starting"}

    class Stamp(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            last["time"] = time.monotonic()
            if record.msg is not HEARTBEAT:
                last["message"] = record.getMessage()
            return True

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(Stamp())
    loggers = [logging.getLogger(name) for name in ("xai_audit",)]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    progress.use_bars(sys.stderr.isatty())
    stopped = threading.Event()

    def beat() -> None:
        while not stopped.wait(1.0):
            quiet = time.monotonic() - last["time"]
            if quiet >= HEARTBEAT_S:
                progress.step(HEARTBEAT, quiet, last["message"].split(" (")[0])

    thread = threading.Thread(target=beat, name="xai-audit-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()
        progress.use_bars(False)
        for logger, (level, propagate) in zip(loggers, saved):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """While a run works, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread, so the
    run records why it stopped (``runs.status`` failed, ``runs.message``) before the process exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame) -> None:
        raise Terminated(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _config_file(config: str | None) -> str:
    """The config file a command reads: CONFIG as given; none, the shipped demo; a bare name that is no
    file here (``example-real-photos``), the shipped config of that name."""
    if config is None:
        return str(DEMO)
    shipped = SHIPPED_CONFIGS / f"{config}.yaml"
    if not Path(config).exists() and Path(config).name == config and shipped.is_file():
        return str(shipped)
    return config


def _named_config(path: str):
    """The config at ``path`` with its registered names checked: schema and name errors come before
    torch, Prefect or open_clip is imported (:mod:`xai_audit.tasks.core.names`), so a typo answers in well under
    a second."""
    from xai_audit.tasks.core.config import ConfigErrors, load_config
    from xai_audit.tasks.core.names import name_problems

    config = load_config(path)
    problems = list(name_problems(config))
    if problems:
        raise ConfigErrors(problems)
    return config


def _cmd_validate(args: argparse.Namespace) -> int:
    config = _named_config(args.config)
    from xai_audit.flows.prefect_api import check_api
    from xai_audit.flows.preflight import check

    if os.environ.get("PREFECT_API_URL"):  # a run would talk to it (environment or profile); run checks it first too
        check_api(os.environ["PREFECT_API_URL"])
    check(config)
    print(f"{args.config}: valid ({len(config.models)} model(s), config hash {config.config_hash()})")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, stages: tuple[str, ...]) -> int:
    config = _named_config(args.config)
    from xai_audit.flows.prefect_api import api_for_run

    with api_for_run() as api_ready:  # a private server starts meanwhile
        from xai_audit.flows.preflight import check

        results = _results_root(args, config.results)
        _writable_results(results)  # first: the checks below build the user's models (work, user code)
        check(config)  # before the progress lines: a refused config prints its one line alone
        from xai_audit.flows.audit import run_audit

        with _progress_to_stderr(), _stop_on_signals():
            api_ready()
            outcome = run_audit(config, results, stages=stages, resume=args.resume, new=args.new)
    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.tasks.results.findings import run_findings

    print(f"run {outcome.run_id}: {outcome.status}")  # first: scripts read the run id from it
    print(f'tables: {results} (e.g. xai-audit query --results {results} "select count(*) from saliency")')
    print("\n".join(run_findings(ResultsStore(results), outcome.run_id)))  # it names failed items too
    if outcome.report_path:  # last, so scripts and `make demo` end on where to look
        print(f"report: {outcome.report_path}")
    return (
        EXIT_ITEMS_FAILED
        if outcome.status == "partial"
        else EXIT_OK
        if outcome.status == "completed"
        else EXIT_UNEXPECTED
    )


def _writable_results(results: str) -> None:
    """A results root that cannot be written is a config problem, found before any work starts."""
    from xai_audit.storage.integrity import require_writable
    from xai_audit.storage.parquet import ResultsStore, StorageError
    from xai_audit.tasks.core.config import ConfigErrors

    try:
        require_writable(ResultsStore(results))
    except StorageError as error:
        raise ConfigErrors([("results", str(error))]) from error


def _cmd_runs(args: argparse.Namespace) -> int:
    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.storage.runs import list_runs

    if args.check:
        return _check_runs(ResultsStore(_results_root(args)), args)
    frame = list_runs(ResultsStore(_results_root(args)))
    if not frame.empty and args.format == "table":
        frame = frame[["run_id", "config_name", "status", "started_at", "seconds", "n_errors", "device", "precision"]]
    _print_frame(frame, args.format, args.output)
    return EXIT_OK


def _check_runs(store, args: argparse.Namespace) -> int:
    """List every unreadable file per run; exit 1 when there is any (nothing is changed)."""
    import pandas as pd

    from xai_audit.storage.parquet import find_bad_files

    bad = find_bad_files(store)
    frame = pd.DataFrame([item.__dict__ for item in bad], columns=["run_id", "table", "path", "problem"])
    if bad or args.format != "table":
        _print_frame(frame, args.format, args.output)
    else:
        print(f"every file under {store.root} reads")
    if bad:
        print(
            f"{len(bad)} unreadable file(s); resuming their run (xai-audit run CONFIG --resume RUN_ID) "
            "sets them aside and recomputes them",
            file=sys.stderr,
        )
    return EXIT_UNEXPECTED if bad else EXIT_OK


def _cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.storage.query import run_query

    try:
        frame = run_query(ResultsStore(_results_root(args)), args.sql)
    except duckdb.Error as error:
        raise _UsageError(f"query failed: {error}") from error
    _print_frame(frame, args.format, args.output)
    return EXIT_OK


def _known_run(store, run_id: str) -> None:
    from xai_audit.tasks.results.summary import require_run

    try:
        require_run(store, run_id)
    except KeyError as error:
        raise _UsageError(error.args[0]) from None


def _cmd_summarize(args: argparse.Namespace) -> int:
    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.tasks.results.summary import summarize_run

    store = ResultsStore(_results_root(args))
    _known_run(store, args.run_id)
    counts = summarize_run(store, args.run_id)
    width = max(map(len, counts))
    for table, rows in counts.items():
        print(f"{table:{width}s} {rows}")
    return EXIT_OK


def _cmd_findings(args: argparse.Namespace) -> int:
    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.tasks.results.findings import run_findings

    store = ResultsStore(_results_root(args))
    _known_run(store, args.run_id)
    print("\n".join(run_findings(store, args.run_id)))
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.tasks.results.report import write_report

    store = ResultsStore(_results_root(args))
    _known_run(store, args.run_id)
    print(f"report: {write_report(store, args.run_id)}")
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    from xai_audit.storage.parquet import ResultsStore, safe_name
    from xai_audit.tasks.results.drift import write_drift
    from xai_audit.tasks.results.figures import drift_summary
    from xai_audit.tasks.results.report import REPORTS

    store = ResultsStore(_results_root(args))
    for run_id in (args.run_a, args.run_b):
        _known_run(store, run_id)
    tables = write_drift(store, args.run_a, args.run_b)
    layers, metrics = tables["summary_drift_layers"], tables["summary_drift_metrics"]
    name = f"{safe_name(args.run_b)}-vs-{safe_name(args.run_a)}.png"
    default = Path(store.base) / REPORTS / "drift" / name if store.local else Path(name)
    figure = drift_summary(
        layers, metrics, f"{args.run_b} vs {args.run_a}", Path(args.figure) if args.figure else default
    )
    # machine-readable formats keep stdout for the table alone
    info = sys.stdout if args.format == "table" else sys.stderr
    changed, units = (int(layers["changed"].sum()), int(layers["units"].sum())) if not layers.empty else (0, 0)
    print(f"{changed} of {units} unit(s) changed their top concept ({args.run_a} -> {args.run_b})", file=info)
    _print_frame(layers.drop(columns="baseline_run_id"), args.format, args.output)
    if args.format == "table":
        print()
        _print_frame(metrics.drop(columns="baseline_run_id").dropna(subset=["delta"]), "table", None)
    print(f"figure: {figure}" if figure else "figure: (nothing to draw)", file=info)
    print(
        f"tables: summary_drift_* with run_id = '{args.run_b}'; "
        f"`xai-audit report {args.run_b}` adds this comparison to its report",
        file=info,
    )
    return EXIT_OK


def _cmd_world_make(args: argparse.Namespace) -> int:
    from xai_audit.tasks.core.config import WorldConfig
    from xai_audit.tasks.world.synthetic import generate_world

    spec = WorldConfig(seed=args.seed, image_size=args.image_size, n_train=args.n_train, n_val=args.n_val)
    try:
        root = generate_world(Path(args.dir), spec)
    except FileExistsError as error:
        raise _UsageError(str(error)) from error
    print(f"wrote a Broden-format world ({spec.n_train} train + {spec.n_val} val images) to {root}")
    return EXIT_OK


def _cmd_init(args: argparse.Namespace) -> int:
    from xai_audit.flows.starter import starter_config

    out = Path(args.out)
    if out.exists() and not args.force:
        raise _UsageError(f"{out} exists; pass --force to overwrite it or --out to write another file")
    text = starter_config(args.model, Path(args.images), Path(args.classes), out, size=args.size)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}: explain-only audit of {args.model} on {args.images}")
    print(f"next: xai-audit validate {out} && xai-audit run {out}")
    return EXIT_OK


def _cmd_deploy(args: argparse.Namespace) -> int:
    import subprocess

    prefect = Path(sys.executable).with_name("prefect")
    command = [
        str(prefect) if prefect.exists() else "prefect",
        "deploy",
        "--no-prompt",
        "--prefect-file",
        str(DEPLOYMENTS),
    ]
    chosen = any(arg in ("--all", "--name", "-n") or arg.startswith("--name=") for arg in args.prefect_args)
    command += args.prefect_args if chosen else ["--all", *args.prefect_args]
    # the pull step of deployments/prefect.yaml runs flows from this package's folder (a checkout's root,
    # or site-packages/xai_audit) unless told otherwise: a path valid on every worker
    env = {**os.environ, "XAI_AUDIT_REPO": os.environ.get("XAI_AUDIT_REPO", str(PACKAGE))}
    return EXIT_OK if subprocess.run(command, cwd=PACKAGE, env=env).returncode == 0 else EXIT_UNEXPECTED


def _cmd_serve(args: argparse.Namespace) -> int:
    config = _named_config(args.config)
    from xai_audit.flows.audit import audit_from_file
    from xai_audit.flows.preflight import check

    check(config)
    parameters = {"config_path": str(Path(args.config).resolve()), "results": _results_root(args, config.results)}
    audit_from_file.serve(name=args.name or f"serve-{config.name}", cron=args.cron, parameters=parameters)
    return EXIT_OK


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from xai_audit.flows.docs import config_reference

    print(config_reference(), end="")
    return EXIT_OK


CONFIG_HELP = (
    "YAML config file, or the name of a shipped config (demo, example-real-photos); default: the demo "
    "(the synthetic world, its trained ResNet18 and toy CLIP)"
)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--results",
        metavar="ROOT",
        help="results root: a folder or fsspec URL (default: $XAI_AUDIT_RESULTS, the config's `results`, or ./results)",
    )
    parser = argparse.ArgumentParser(
        prog="xai-audit",
        description=__doc__.split("\n\n")[0],
        parents=[common],
        epilog="Exit codes: 0 ok, 2 bad usage/config, 3 some items failed, 1 unexpected.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "--format", choices=("table", "csv", "json", "parquet"), default="table", help="output format (default: table)"
    )
    output.add_argument("--output", metavar="PATH", help="write to PATH instead of stdout (required for parquet)")

    for name, stages, text in (
        ("run", ("dissect", "explain"), "Run the whole audit of CONFIG: dissect, explain, summarize, report."),
        ("explain", ("explain",), "Run only the per-image explanations and their metrics."),
        ("dissect", ("dissect",), "Run only the neuron labelling (CLIP-Dissect, Network Dissection)."),
    ):
        command = add(name, text)
        command.add_argument("config", nargs="?", help=CONFIG_HELP)
        restart = command.add_mutually_exclusive_group()
        restart.add_argument(
            "--resume",
            metavar="RUN_ID",
            help="continue RUN_ID, computing only its missing work units "
            "(default: the newest run of this config when it failed or its process died)",
        )
        restart.add_argument(
            "--new", action="store_true", help="start a fresh run even when the last run of this config was interrupted"
        )
        command.set_defaults(handler=lambda args, stages=stages: _cmd_run(args, stages))
    add("validate", "Check CONFIG and report every problem with its field path (exit 2 when invalid).").add_argument(
        "config", nargs="?", help=CONFIG_HELP
    )
    init = add(
        "init",
        "Write a commented starter config auditing your model on your images (explain-only; validates and runs).",
    )
    init.add_argument(
        "--model",
        required=True,
        metavar="FILE.py:FUNCTION",
        help="a function returning your torch.nn.Module: in a file in the config's folder, or package.module:function",
    )
    init.add_argument("--images", required=True, metavar="FOLDER", help="the images to explain (searched recursively)")
    init.add_argument(
        "--classes", required=True, metavar="FILE", help="class names, one per line, in the order of the outputs"
    )
    init.add_argument("--out", default="audit.yaml", metavar="CONFIG", help="where to write it (default: audit.yaml)")
    init.add_argument("--size", type=int, default=224, help="the model's input side in pixels (default: 224)")
    init.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    init.set_defaults(handler=_cmd_init)
    add("summarize", "Recompute the summary of RUN_ID from its Parquet tables.").add_argument("run_id")
    add("report", "Write the HTML report of RUN_ID (RESULTS/reports/RUN_ID/index.html).").add_argument("run_id")
    add("findings", "Print the findings digest of RUN_ID (what `xai-audit run` prints at its end).").add_argument(
        "run_id"
    )
    diff = sub.add_parser(
        "diff",
        help="Compare RUN_B with the earlier RUN_A: changed unit concepts, histogram and metric deltas.",
        description="Compare RUN_B with the earlier RUN_A: units whose top concept changed (per layer and method), "
        "concept-histogram deltas, and agreement/localization/faithfulness deltas per method. "
        "Writes the summary_drift_* tables under RUN_B and a figure.",
        parents=[common, output],
    )
    diff.add_argument("run_a", help="the baseline run")
    diff.add_argument("run_b", help="the run compared with it")
    diff.add_argument(
        "--figure", metavar="PATH", help="where the PNG goes (default: RESULTS/reports/drift/RUN_B-vs-RUN_A.png)"
    )
    runs = sub.add_parser(
        "runs",
        help="List runs with status and timings.",
        description="List runs with status and timings.",
        parents=[common, output],
    )
    runs.add_argument(
        "--check",
        action="store_true",
        help="instead, read every file under the results root and list the unreadable "
        "or corrupt ones per run (exit 1 when there is any)",
    )
    query = sub.add_parser(
        "query",
        help="Run SQL over the results (one DuckDB view per table).",
        description="Run SQL over the results; every table is a view of the same name.",
        parents=[common, output],
    )
    query.add_argument("sql", help='e.g. "select method, avg(iou) from agreement group by method"')
    add("config-reference", "Print the config reference (Markdown) generated from the schema.")
    deploy = sub.add_parser(
        "deploy",
        help="Register the deployments of deployments/prefect.yaml (wraps `prefect deploy`).",
        description="Register the deployments of deployments/prefect.yaml with the Prefect API: runs "
        "`prefect deploy --prefect-file deployments/prefect.yaml` (with --all unless a --name is given) "
        "in the package's folder (a checkout's root, or the installed xai_audit); further arguments go to "
        "`prefect deploy` unchanged.",
    )
    deploy.add_argument(
        "prefect_args", nargs=argparse.REMAINDER, help="arguments for `prefect deploy`, e.g. --name nightly-audit"
    )
    deploy.set_defaults(handler=_cmd_deploy)
    serve = add("serve", "Serve CONFIG's audit as a deployment from this process (no work pool), on a cron schedule.")
    serve.add_argument("config", help="YAML config file")
    serve.add_argument("--cron", help='cron schedule, e.g. "0 2 * * *" (default: no schedule, runs on demand only)')
    serve.add_argument("--name", help="deployment name (default: serve-CONFIG_NAME)")
    serve.set_defaults(handler=_cmd_serve)
    world = sub.add_parser(
        "world",
        help="The synthetic world.",
        description="The synthetic world (Broden format, pixel-exact masks, captions).",
    )
    world_sub = world.add_subparsers(dest="world_command", required=True, metavar="ACTION")
    make = world_sub.add_parser(
        "make",
        help="Generate a world into DIR.",
        description="Generate a synthetic world in Broden's format into DIR (absent or empty).",
    )
    make.add_argument("dir", help="output folder (absent or empty)")
    from xai_audit.tasks.core.config import WorldConfig

    for option, field in (
        ("--seed", "seed"),
        ("--image-size", "image_size"),
        ("--n-train", "n_train"),
        ("--n-val", "n_val"),
    ):
        info = WorldConfig.model_fields[field]
        make.add_argument(option, type=int, default=info.default, help=f"{info.description} (default: {info.default})")
    make.set_defaults(handler=_cmd_world_make)

    sub.choices["validate"].set_defaults(handler=_cmd_validate)
    sub.choices["report"].set_defaults(handler=_cmd_report)
    diff.set_defaults(handler=_cmd_diff)
    sub.choices["summarize"].set_defaults(handler=_cmd_summarize)
    sub.choices["findings"].set_defaults(handler=_cmd_findings)
    sub.choices["config-reference"].set_defaults(handler=_cmd_config_reference)
    runs.set_defaults(handler=_cmd_runs)
    query.set_defaults(handler=_cmd_query)
    return parser


def main(argv: list[str] | None = None) -> int:
    from xai_audit.flows.prefect_api import ApiUnavailable, configure_environment

    _quiet_offline_prefect()
    configure_environment()  # before Prefect is imported: its home and API come from here
    args = build_parser().parse_args(argv)
    if hasattr(args, "config"):
        args.config = _config_file(args.config)
    from xai_audit.tasks.core.config import ConfigErrors
    from xai_audit.tasks.core.errors import XaiAuditError

    try:
        return args.handler(args)
    except ApiUnavailable as error:
        print(f"xai-audit: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Terminated as error:
        print(f"xai-audit: {error}; the run is marked failed, the next run of this config resumes it", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit now: task threads still running would otherwise be joined at interpreter exit
        # (minutes); what they write is atomic, so nothing partial becomes visible.
        os._exit(128 + error.signum)
    except ConfigErrors as error:
        where = f"invalid config {getattr(args, 'config', None) or getattr(args, 'out', '')}"
        if len(error.problems) == 1:  # one line, as scripts and log scanners read it
            print(f"{where}: {': '.join(error.problems[0])}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{where}:", file=sys.stderr)
        for field, message in error.problems:
            print(f"  {field}: {message}", file=sys.stderr)
        return EXIT_USAGE
    except _UsageError as error:
        print(f"xai-audit: {error}", file=sys.stderr)
        return EXIT_USAGE
    except XaiAuditError as error:  # an expected failure (storage, unreadable file): its message says what and where
        print(f"xai-audit: {error}", file=sys.stderr)
        return EXIT_UNEXPECTED
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN_ID", file=sys.stderr)
        return EXIT_UNEXPECTED
    except Exception as error:  # noqa: BLE001 - the CLI's last line of defence names the failure
        print(f"xai-audit: unexpected {type(error).__name__}: {error}", file=sys.stderr)
        if os.environ.get("XAI_AUDIT_DEBUG"):
            raise
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
