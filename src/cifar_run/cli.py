"""Command line: `cifar-run` (the Hydra app) and `cifar-report`.

User mistakes become one line on stderr and exit status 2, before any data is loaded:
`main` composes and validates the config from the command line first (cifar_run.preflight;
Hydra's own messages span several lines and exit with 1), then hands over to `@hydra.main`.
Ctrl-C (exit status 130) and the operating system refusing a write (74) are one line too,
saying how to carry on.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cifar_run import exits, interrupts
from cifar_run.config import search as search_path
from cifar_run.config.compose import CONF_DIR
from cifar_run.constants import set_openmp_defaults
from cifar_run.errors import UserError
from cifar_run.exits import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_OS_ERROR, fail
from cifar_run.outputs import sweep
from cifar_run.preflight import MULTIRUN_FLAGS, dropped_by_dry_run, preflight

sweep.register_resolvers()  # hydra.sweep.subdir names job folders with it


def _dry_run_without_folders(folder_key: str) -> None:
    """Hydra makes the run or sweep folder (.hydra/, logs, job folders) before any job
    starts; a dry run writes nothing of its own, so give Hydra a temporary folder (in place
    of any the command names) and remove it afterwards instead of leaving empty runs under
    outputs/. A launcher the command names is left out too: a dry run checks its jobs here
    and submits nothing (hydra/launcher=slurm off a cluster would fail, on one it would
    queue jobs that do nothing)."""
    import shutil
    import tempfile

    dropped = [a for a in sys.argv[1:] if not a.startswith("-") and dropped_by_dry_run(a)]
    launcher = [a for a in dropped if "launcher" in a.split("=")[0]]
    if launcher:
        print(
            f"cifar-run: dry run: {' '.join(launcher)} not used; the jobs are checked here "
            "and nothing is submitted",
            file=sys.stderr,
            flush=True,
        )
    folder = tempfile.mkdtemp(prefix="cifar-run-dry-")
    sys.argv[1:] = [a for a in sys.argv[1:] if a not in dropped] + [f"{folder_key}={folder}"]
    try:
        _hydra_main()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    """One run or sweep job. Hydra prints a traceback for an exception raised here, so the
    kinds a user can act on end here in one line; KeyboardInterrupt passes on to `main`."""
    from cifar_run.run import run

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep_dir = str(hydra_cfg.sweep.dir) if multirun else None
    where = exits.where
    where.out_dir, where.sweep_dir, where.dry_run = out_dir, sweep_dir, bool(cfg.dry_run)
    if os.getpid() != where.main_pid:
        _as_a_sweep_worker()
    try:
        if multirun:
            # A failing job must not stop the sweep: it is recorded, and the summary callback
            # (outputs.callbacks) reports it and sets the exit status once every job has run.
            sweep.run_job(cfg, out_dir, int(hydra_cfg.job.num), run)
            return
        results = run(cfg, None if cfg.dry_run else out_dir)
        if results.get("status") == "completed":
            # The table and where everything is: the logs above scroll by; this is the answer.
            table = out_dir / "results.md"
            print(table.read_text() if table.is_file() else "", end="")
            print(f"run folder: {out_dir}", flush=True)
    except Exception as exc:
        _job_error(exc)


def _job_error(exc: Exception) -> NoReturn:
    """An exception out of a run (Hydra would print a traceback): one line where the user can
    act on it; Ctrl-C where the interrupt was turned into another error on its way out."""
    if interrupts.pressed():
        raise KeyboardInterrupt from None
    if isinstance(exc, UserError):
        fail(str(exc))
    if isinstance(exc, BrokenPipeError):
        _stdout_closed()
    if isinstance(exc, OSError):
        _os_error(exc)
    raise exc


def _as_a_sweep_worker() -> None:
    """A sweep job in a worker process of the launcher (joblib), which the process that
    started the sweep stops on Ctrl-C (the terminal's reaches the whole process group): the
    worker leaves Ctrl-C to it, and the progress bar's lock is a thread lock, because the
    semaphore tqdm would make under the launcher's start method outlives a stopped worker
    (Python's resource tracker then warns about it after the one line)."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _carry_on(out_dir: Path | None, sweep_dir: str | None, dry_run: bool) -> str:
    """What to do after the run in `out_dir` (or the sweep in `sweep_dir`) stopped short."""
    if dry_run:
        return "nothing was written"
    if sweep_dir is not None:
        return (
            f"rerun the same command with hydra.sweep.dir={sweep_dir}: completed jobs are "
            "skipped, the interrupted one resumes from its last finished epoch"
        )
    if out_dir is None:
        return exits.NOT_STARTED
    if sweep.read_status(out_dir) == "completed":
        return f"the run had completed: its results are in {out_dir}"
    from cifar_run.engine.checkpoint import stage_path, state_path

    if state_path(out_dir).is_file():
        where = (
            "where the pruning stage stopped"
            if stage_path(out_dir).is_file()
            else "from the last finished epoch"
        )
        return f"resume {where}: the same command plus resume=true hydra.run.dir={out_dir}"
    return f"no epoch had finished in {out_dir}, so there is nothing to resume: run it again"


def _interrupted(out_dir: Path | None, sweep_dir: str | None, dry_run: bool) -> NoReturn:
    """Ctrl-C: one line saying how to carry on instead of a traceback; exit 130 as shells do.
    run() has already marked the run failed in results.json (error: KeyboardInterrupt)."""
    how = _carry_on(out_dir, sweep_dir, dry_run)
    print(f"cifar-run: interrupted; {how}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


def _os_error(exc: OSError) -> NoReturn:
    """The operating system refused a write (a full disk, no permission, a read-only file
    system): one line naming the file and what to do. The files written atomically hold their
    last whole version (state.pt: the last finished epoch's); results.json says `failed`, or
    `running` where even that write failed."""
    how = _carry_on(exits.where.out_dir, exits.where.sweep_dir, exits.where.dry_run)
    fail(f"{exits.os_error_line(exc)}; {how}", status=EXIT_OS_ERROR)


def _stdout_closed() -> NoReturn:
    """The reader of stdout went away (`cifar-run --help | head`): stop quietly, as Unix
    tools do, instead of a BrokenPipeError traceback. stdout is pointed at /dev/null first,
    because Python's flush at exit would fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(EXIT_BROKEN_PIPE)


def main() -> None:
    """Entry point of `cifar-run`.

    Ctrl-C raises KeyboardInterrupt in the main thread (cifar_run.interrupts); it ends here as
    one line. Once that has begun, and once the outcome is decided and the process only exits
    (atexit handlers, the logging shutdown), another press would raise again inside that code
    and end in a traceback: SIGINT is ignored from then on, set by a call to signal.signal as
    the very first thing (a C function: Python runs a pending handler only once it has
    returned). Until then a further press raises again, so a KeyboardInterrupt that some
    library swallowed does not leave Ctrl-C dead."""
    try:
        interrupts.install()  # `cifar_run.cli:main` called without __main__.py
        exits.where.main_pid = os.getpid()
        set_openmp_defaults()  # before anything imports torch
        # A log line that cannot be written (a full disk) is dropped: the logging module would
        # print a traceback for each.
        logging.raiseExceptions = False
        _main()
        if interrupts.pressed():  # while Hydra finished up: the press waits to be raised
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _interrupted(exits.where.out_dir, exits.where.sweep_dir, exits.where.dry_run)
    except Exception as exc:
        if interrupts.pressed():  # a library's clean-up turned the interrupt into its own error
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _interrupted(exits.where.out_dir, exits.where.sweep_dir, exits.where.dry_run)
        if isinstance(exc, BrokenPipeError):  # in Hydra's own printing (--help, --cfg)
            _stdout_closed()
        if isinstance(exc, OSError):  # Hydra's own writes into the run folder
            _os_error(exc)
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _main() -> None:
    if sys.argv[1:2] == ["predict"]:  # no override is a bare word: the subcommand
        from cifar_run.predict import predict_main

        predict_main(sys.argv[2:])
        return
    # Hydra's parser takes overrides as one run of positional arguments, so `-m` or
    # `--config-dir DIR` between two overrides (or before an override appended below) is an
    # argparse error: put the flags first, where they mean the same.
    try:
        rest, config_dirs = search_path.split_config_dirs(sys.argv[1:])
    except UserError as exc:
        fail(str(exc))
    flags = [a for a in rest if a in MULTIRUN_FLAGS]
    front = [*flags[:1], *(f"--config-dir={d}" for d in config_dirs)]
    sys.argv[1:] = front + [a for a in rest if a not in MULTIRUN_FLAGS]
    if "--version" in sys.argv[1:]:  # Hydra's own flag would print only Hydra's version
        print(version_line("cifar-run"))
        return
    try:
        folder_key = preflight(sys.argv[1:])
    except UserError as exc:
        fail(str(exc))
    if folder_key is not None:
        _dry_run_without_folders(folder_key)
    else:
        interrupts.to_this_process_only()  # a run or sweep: it may start helper processes
        _hydra_main()


def version_line(prog: str) -> str:
    """`PROG --version`: this package's version and the versions its numbers depend on."""
    import torch

    from cifar_run.engine.reproducibility import environment

    env = environment(torch.device("cpu"))
    return (
        f"{prog} {env['cifar_run']} (torch {env['torch']}, torchvision {env['torchvision']}, "
        f"hydra-core {env['hydra']}, Python {env['python']})"
    )


def report_main(argv: list[str] | None = None) -> None:
    """Entry point of `cifar-report`: the sweep summary of any run or sweep folders."""
    try:
        _report(argv)
    except BrokenPipeError:
        _stdout_closed()


def _report(argv: list[str] | None) -> None:
    import argparse

    if "--version" in (sys.argv[1:] if argv is None else argv):  # before PATH is required
        print(version_line("cifar-report"))
        return
    parser = argparse.ArgumentParser(
        prog="cifar-report",
        description="Tabulate and plot run folders: prints the Markdown table and writes "
        "summary.csv, summary.md, summary.png (and summary_seeds.* when seed varies; "
        "reference.md/.csv, ours beside the report's figures, for runs of experiment=reportNNN).",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="run or sweep folders (or parents)"
    )
    # Handled above, before PATH is required; declared so that --help lists it.
    parser.add_argument("--version", action="store_true", help="print the versions and exit")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where the summary files go (default: into PATH when one is given; with "
        "several PATHs, only the table is printed unless --out is given)",
    )
    args = parser.parse_args(argv)

    from cifar_run.outputs.run_folders import NoRunsError, load_runs
    from cifar_run.outputs.summary import summarize, write_summary

    try:
        runs = load_runs(args.paths)
    except NoRunsError as exc:
        fail(str(exc), prog="cifar-report")
    summary = summarize(runs)
    # The files first: a reader that stops early (`cifar-report DIR | head`) still gets them.
    out = args.out or (args.paths[0] if len(args.paths) == 1 else None)
    written = []
    if out is not None:
        try:
            written = write_summary(summary, out)
        except OSError as exc:
            fail(f"--out {out}: cannot write there ({exc.strerror or exc})", prog="cifar-report")
    print(summary.markdown(), end="", flush=True)
    for line in summary.selection():
        print(f"\n{line}", flush=True)
    seeds = summary.seeds_markdown()
    if seeds is not None:
        print(f"\nMean and standard deviation over seeds:\n\n{seeds}", end="", flush=True)
    reference = summary.reference_markdown()
    if reference is not None:
        print(f"\n{reference}", end="", flush=True)
    if out is None:
        print(
            "cifar-report: several folders given; pass --out DIR to write the summary files",
            file=sys.stderr,
        )
        return
    print(f"cifar-report: wrote {', '.join(p.name for p in written)} to {out}", file=sys.stderr)
