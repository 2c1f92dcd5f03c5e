"""Command line: `cifar-run` (the Hydra app) and `cifar-report`.

User mistakes become one line on stderr and exit status 2, before any data is loaded:
`main` composes and validates the config from the command line first (Hydra's own
messages span several lines and exit with 1), then hands over to `@hydra.main`.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cifar_run.constants import set_openmp_defaults
from cifar_run.errors import UserError
from cifar_run.outputs import sweep

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def conf_dir() -> Path:
    """`conf/`: inside the package in a wheel, at the repository root in a source checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


CONF_DIR = conf_dir()
sweep.register_resolvers()  # hydra.sweep.subdir names job folders with it

# Hydra flags that print or do something other than a run: leave them to Hydra untouched.
_HYDRA_ONLY_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--experimental-rerun",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--package",
    "-p",
    "--resolve",
}
_MULTIRUN_FLAGS = {"--multirun", "-m"}
# Hydra runs in one mode per command; with -m these end in its ValueError traceback.
_MODE_FLAGS = {"--run", "-r", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}


def fail(message: str, prog: str = "cifar-run") -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `cifar-run OVERRIDES` would run, composed without a Hydra run (no run
    folder, no logging set-up): for scripts and tests."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def groups() -> dict[str, list[str]]:
    """Config groups and their options, read from conf/."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(CONF_DIR.iterdir())
        if d.is_dir() and d.name != "hydra"
    }


def _compose_error(exc: BaseException, overrides: list[str], base: DictConfig) -> str:
    text = str(exc)
    while not text.strip() and exc.__cause__ is not None:  # Hydra wraps some errors bare
        exc = exc.__cause__
        text = str(exc)
    match = re.search(r"Could not override '([^']+)'", text) or re.search(
        r"Key '([^']+)' is not in struct", text
    )
    if match:
        key = match.group(1)
        given = next((o for o in overrides if o.lstrip("+~").split("=")[0] == key), key)
        return _unknown_key(given, key, base)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _hydra_error(exc: BaseException) -> str:
    """One line for a bad hydra/... override: Hydra's first line, its reason, its options."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    cause = str(exc.__cause__).strip() if exc.__cause__ is not None else ""
    if cause and cause != "None":
        line += f" ({cause.splitlines()[0]})"  # e.g. Key 'n_jobs' not in 'BasicLauncherConf'
    listed = text.partition("Available options in")[2].partition("Config search path")[0]
    options = [o.strip() for o in listed.splitlines()[1:] if o.strip()]
    if options:
        line += f"; choose one of: {', '.join(options)}"
    if "hydra/launcher/joblib" in text or "hydra/launcher/submitit" in text:
        line += ' (the launcher plugins: pip install "cifar-run[sweep]" or "cifar-run[slurm]")'
    return line


def _unknown_key(given: str, key: str, base: DictConfig) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    known = sorted(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = (
        f"did you mean {'.'.join(filter(None, [parent, close[0]]))}?"
        if close
        else (f"known keys: {', '.join(known)}")
    )
    return f"{given}: unknown key '{key}'; {hint}"


_ABSENT = object()


def _check_added_keys(job: list[str], options: dict[str, list[str]]) -> None:
    """`+key=value` may only set keys the config has: an added key would be read by nothing.

    (`+group=option` selects an option of a config group and is left alone.)
    """
    from hydra import compose

    added = {
        o.lstrip("+").split("=")[0]: o
        for o in job
        if o.startswith("+") and o.lstrip("+").split("=")[0] not in options
    }
    if not added:
        return
    base = compose(config_name="config", overrides=[o for o in job if o not in added.values()])
    for key, given in added.items():
        if OmegaConf.select(base, key, default=_ABSENT) is _ABSENT:
            fail(_unknown_key(given, key, base))


def _check_can_create(key: str, folder: Path) -> None:
    """The folder exists, or its nearest existing parent is a folder we may write in:
    otherwise Hydra's mkdir would end the run with a traceback before any job starts."""
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent == folder and folder.is_dir():
        return
    if not parent.is_dir():
        fail(f"{key}={folder}: {parent} is a file, not a folder; choose another {key}")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"{key}={folder}: no permission to create folders in {parent}; choose another {key}")


def _check_run_folder(job: list[str], hydra_overrides: list[str]) -> None:
    """A single run's folder: with resume=true it must hold a checkpoint of this config;
    without, it must not hold another run (run() checks both again).

    Checked before Hydra starts, which would otherwise first rewrite the folder's .hydra/.
    """
    from hydra import compose
    from omegaconf import open_dict

    from cifar_run.engine.resume import open_resume, refuse_overwrite
    from cifar_run.run import resolve_device

    cfg = compose(config_name="config", overrides=job + hydra_overrides, return_hydra_config=True)
    try:
        run_dir = Path(cfg.hydra.run.dir)
    except Exception:  # a folder named by values only a running job knows: run() checks it
        return
    _check_can_create("hydra.run.dir", run_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    if cfg.resume:
        open_resume(run_dir, cfg, resolve_device(cfg.device))
    else:
        refuse_overwrite(run_dir)


def _check_group_choices(parsed: list, options: dict[str, list[str]]) -> None:
    for override in parsed:
        group = override.key_or_group
        if group not in options or override.is_delete():
            continue
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.value()]
        )
        for value in values:
            if str(value) not in options[group]:
                fail(
                    f"{group}={value}: unknown {group}; choose one of: {', '.join(options[group])}"
                )


def preflight(argv: list[str]) -> str | None:
    """Compose and validate every job the command line asks for; exit 2 on a mistake.

    Returns the Hydra folder key (`hydra.run.dir` or `hydra.sweep.dir`) of a dry run that
    left it at its default under outputs/ (see _dry_run_without_folders), else None."""
    flags = {a.split("=")[0] for a in argv if a.startswith("-")}
    if flags & _MULTIRUN_FLAGS and flags & _MODE_FLAGS:
        mode = sorted(flags & _MODE_FLAGS)[-1]
        fail(
            f"{mode} with -m: Hydra takes one mode at a time; drop -m and give one value "
            f"per key to see a job (e.g. `cifar-run batch_size=8 {mode} ...`)"
        )
    if flags & _HYDRA_ONLY_FLAGS:
        return None
    multirun = bool(flags & _MULTIRUN_FLAGS)
    overrides = [a for a in argv if not a.startswith("-")]

    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cifar_run.config.checks import validate

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # the parser's message names the bad override
        fail(str(exc).strip().splitlines()[0])
    task = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    hydra_overrides = [o.input_line for o in parsed if o.key_or_group.startswith("hydra")]
    options = groups()
    _check_group_choices(task, options)
    sweeps = [o.input_line for o in task if o.is_sweep_override()]
    if sweeps and not multirun:
        fail(f"{sweeps[0]}: several values need multirun; add -m")
    jobs = BasicSweeper.split_arguments(task, None)[0] if task else [[]]
    all_dry = True
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        if hydra_overrides:  # hydra/launcher=..., hydra.sweep.dir=...: checked once for all jobs
            try:
                compose(config_name="config", overrides=hydra_overrides, return_hydra_config=True)
            except Exception as exc:
                fail(_hydra_error(exc))
        for job in jobs:
            try:
                cfg = compose(config_name="config", overrides=job)
            except Exception as exc:  # the defaults alone (composed only now) name the known keys
                fail(_compose_error(exc, job, compose(config_name="config")))
            _check_added_keys(job, options)
            all_dry = all_dry and bool(cfg.dry_run)
            if not multirun:
                # In a sweep a bad value fails its own job only; the others still run.
                try:
                    validate(cfg)
                    if not cfg.dry_run:
                        _check_run_folder(job, hydra_overrides)
                except UserError as exc:
                    fail(str(exc))
        if multirun and not all_dry:
            sweep_cfg = compose(
                config_name="config", overrides=hydra_overrides, return_hydra_config=True
            )
            _check_can_create("hydra.sweep.dir", Path(sweep_cfg.hydra.sweep.dir))
        if multirun and any(o.startswith("hydra.sweep.dir=") for o in hydra_overrides):
            _check_completed_jobs(jobs, hydra_overrides)
    folder_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    chosen = any(o.startswith(f"{folder_key}=") for o in hydra_overrides)
    return folder_key if all_dry and not chosen else None


def _check_completed_jobs(jobs: list[list[str]], hydra_overrides: list[str]) -> None:
    """A rerun into an existing sweep folder skips the jobs completed there (sweep.run_job).
    Folder names leave out some keys (data.root), so refuse the whole rerun when a completed
    job's config.yaml differs from the job this command would run: skipping it would report
    the old config's results as the new one's. Call inside initialize_config_dir."""
    from hydra import compose
    from omegaconf import open_dict

    from cifar_run.engine.resume import run_config_diff

    for num, job in enumerate(jobs):
        cfg = compose(
            config_name="config", overrides=[*job, *hydra_overrides], return_hydra_config=True
        )
        sweep_dir = str(cfg.hydra.sweep.dir)
        name = sweep.job_dir_name(num, cfg.hydra.job.override_dirname)
        folder = Path(sweep_dir) / name
        if sweep.read_status(folder) != "completed":
            continue
        with open_dict(cfg):
            del cfg["hydra"]  # the job's own config, as it would write it
        differences = run_config_diff(folder, cfg)
        if differences:
            fail(
                f"hydra.sweep.dir={sweep_dir}: job {name} there completed with "
                f"another config ({'; '.join(differences[:3])}); a rerun would skip it and "
                "report its results as this config's: choose a new hydra.sweep.dir"
            )


def _dry_run_without_folders(folder_key: str) -> None:
    """Hydra makes the run or sweep folder (.hydra/, logs, job folders) before any job
    starts; a dry run writes nothing of its own, so give Hydra a temporary folder and
    remove it afterwards instead of leaving empty runs under outputs/."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="cifar-run-dry-")
    sys.argv.append(f"{folder_key}={folder}")
    try:
        _hydra_main()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from cifar_run.run import run

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
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
    except UserError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        _interrupted(out_dir, str(hydra_cfg.sweep.dir) if multirun else None, cfg.dry_run)
    except BrokenPipeError:  # Hydra would print a traceback for it
        _stdout_closed()


def _interrupted(out_dir: Path, sweep_dir: str | None, dry_run: bool) -> NoReturn:
    """Ctrl-C: one line saying how to carry on instead of a traceback; exit 130 as shells do.
    run() has already marked the run failed in results.json (error: KeyboardInterrupt)."""
    from cifar_run.engine.checkpoint import stage_path, state_path

    if dry_run:
        how = "nothing was written"
    elif sweep_dir is not None:
        how = (
            f"rerun the same command with hydra.sweep.dir={sweep_dir}: completed jobs are "
            "skipped, the interrupted one resumes from its last finished epoch"
        )
    elif state_path(out_dir).is_file():
        where = (
            "where the pruning stage stopped"
            if stage_path(out_dir).is_file()
            else "from the last finished epoch"
        )
        how = f"resume {where}: the same command plus resume=true hydra.run.dir={out_dir}"
    else:
        how = f"no epoch had finished in {out_dir}, so there is nothing to resume: run it again"
    print(f"cifar-run: interrupted; {how}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


def _stdout_closed() -> NoReturn:
    """The reader of stdout went away (`cifar-run --help | head`): stop quietly, as Unix
    tools do, instead of a BrokenPipeError traceback. stdout is pointed at /dev/null first,
    because Python's flush at exit would fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(EXIT_BROKEN_PIPE)


def main() -> None:
    """Entry point of `cifar-run`."""
    set_openmp_defaults()  # before anything imports torch
    # Hydra's parser takes overrides as one run of positional arguments, so `-m` between
    # two overrides (or before an override appended below) is an argparse error: put the
    # flag first, where it means the same.
    flags = [a for a in sys.argv[1:] if a in _MULTIRUN_FLAGS]
    sys.argv[1:] = flags[:1] + [a for a in sys.argv[1:] if a not in _MULTIRUN_FLAGS]
    if "--version" in sys.argv[1:]:  # Hydra's own flag would print only Hydra's version
        print(version_line("cifar-run"))
        return
    try:
        folder_key = preflight(sys.argv[1:])
        if folder_key is not None:
            _dry_run_without_folders(folder_key)
        else:
            _hydra_main()
    except BrokenPipeError:  # in Hydra's own printing (--help, --cfg)
        _stdout_closed()


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
        "summary.csv, summary.md, summary.png (and summary_seeds.* when seed varies).",
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

    from cifar_run.outputs.summary import NoRunsError, load_runs, summarize, write_summary

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
    if out is None:
        print(
            "cifar-report: several folders given; pass --out DIR to write the summary files",
            file=sys.stderr,
        )
        return
    print(f"cifar-report: wrote {', '.join(p.name for p in written)} to {out}", file=sys.stderr)
