"""Checking a `cifar-run` command line before Hydra starts: every mistake is one UserError.

Hydra's own messages span several lines and exit with 1, and some mistakes would surface
only once Hydra has made or rewritten a folder, or after data has loaded: so every job the
command line asks for is composed and validated here first, with its run or sweep folder.
cli.main turns a UserError into one line on stderr and exit status 2.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cifar_run.config import search as search_path
from cifar_run.config.compose import CONF_DIR, groups
from cifar_run.errors import UserError
from cifar_run.outputs import folder_lock, sweep
from cifar_run.outputs.loggers.settings import check_loggers
from cifar_run.search.checks import check_search, is_search

# Hydra flags that print or do something other than a run: leave them to Hydra untouched.
_HYDRA_ONLY_FLAGS = set(
    "--help -h --hydra-help --version --cfg -c --info -i --shell-completion"
    " -sc --experimental-rerun --config-path -cp --config-name -cn --package -p --resolve".split()
)
MULTIRUN_FLAGS = {"--multirun", "-m"}
SEARCH = "hparams_search"  # the config group of searches (conf/hparams_search/)
# Hydra runs in one mode per command; with -m these end in its ValueError traceback.
_MODE_FLAGS = {"--run", "-r", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}


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


def _override_key(override: str) -> str:
    """`model` of `model=cnn`, `+model.foo=1` -> `model.foo`, `group@pkg=x` -> `group`."""
    return override.lstrip("+~").split("=")[0].split("@")[0]


def _base_config(job: list[str], options: dict[str, list[str]], search: list[str]) -> DictConfig:
    """The config of the job's group choices alone (model=cnn, experiment=...): what its
    other keys are checked against, so a wrong key is told the keys of the model chosen.
    Call inside initialize_config_dir."""
    from hydra import compose

    chosen = [o for o in job if _override_key(o) in options]
    for overrides in (chosen, []):
        try:
            return compose(config_name="config", overrides=[*overrides, *search])
        except Exception:  # a choice that does not compose: the defaults name the keys
            continue
    return compose(config_name="config")


def _check_added_keys(job: list[str], options: dict[str, list[str]], search: list[str]) -> None:
    """`+key=value` may only set keys the config has: an added key would be read by nothing.

    (`+group=option` selects an option of a config group and is left alone.)
    """
    from hydra import compose

    added = {
        _override_key(o): o for o in job if o.startswith("+") and _override_key(o) not in options
    }
    if not added:
        return
    kept = [o for o in job if o not in added.values()]
    base = compose(config_name="config", overrides=[*kept, *search])
    for key, given in added.items():
        if OmegaConf.select(base, key, default=_ABSENT) is _ABSENT:
            raise UserError(_unknown_key(given, key, base))


def _check_can_create(key: str, folder: Path) -> None:
    """The folder exists, or its nearest existing parent is a folder we may write in:
    otherwise Hydra's mkdir would end the run with a traceback before any job starts."""
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent == folder and folder.is_dir():
        return
    if not parent.is_dir():
        raise UserError(f"{key}={folder}: {parent} is a file, not a folder; choose another {key}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"{key}={folder}: no permission to create folders in {parent}; choose another {key}"
        )


def _check_run_folder(job: list[str], hydra_overrides: list[str]) -> None:
    """A single run's folder: with resume=true it must hold a checkpoint of this config;
    without, it must not hold another run (run() checks both again); either way no other
    cifar-run may be writing into it.

    Checked before Hydra starts, which would otherwise first rewrite the folder's .hydra/.
    """
    from hydra import compose
    from omegaconf import open_dict

    from cifar_run.config.data_keys import follow_data
    from cifar_run.engine.resume import open_resume, refuse_overwrite
    from cifar_run.run import resolve_device

    cfg = compose(config_name="config", overrides=job + hydra_overrides, return_hydra_config=True)
    try:
        run_dir = Path(cfg.hydra.run.dir)
    except Exception:  # a folder named by values only a running job knows: run() checks it
        return
    _check_can_create("hydra.run.dir", run_dir)
    # FolderLock takes it before Hydra writes
    folder_lock.refuse_if_in_use(run_dir, "hydra.run.dir")
    with open_dict(cfg):
        del cfg["hydra"]
    if cfg.resume:  # compared as run() records its config: the data-following keys filled in
        open_resume(run_dir, follow_data(cfg), resolve_device(cfg.device))
    else:
        refuse_overwrite(run_dir)


def _check_group_choices(parsed: list, options: dict[str, list[str]]) -> None:
    for override in parsed:
        group = override.key_or_group
        if group not in options or override.is_delete():
            continue
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                continue  # a search range (interval): the search checks it
            values = list(override.sweep_iterator())
        else:
            values = [override.value()]
        # A list selects several options at once: logger=[csv,tensorboard].
        values = [v for value in values for v in (value if isinstance(value, list) else [value])]
        for value in values:
            if str(value) not in options[group]:
                raise UserError(
                    f"{group}={value}: unknown {group}; choose one of: {', '.join(options[group])}"
                )


# Hydra overrides a dry run leaves out: it runs in a temporary folder and submits nothing.
_DRY_RUN_DROPS = ("hydra.run.dir", "hydra.sweep.dir", "hydra/launcher", "hydra.launcher")


def dropped_by_dry_run(override: str) -> bool:
    """An override naming the run or sweep folder or the launcher: a dry run leaves it out."""
    key = _override_key(override)
    return any(key == d or key.startswith(f"{d}.") for d in _DRY_RUN_DROPS)


def _search_entries(parsed: list, config_dirs: list[str]) -> list[str]:
    """The search-path entries of a --config-dir folder and a hydra.searchpath override."""
    listed: list[str] = []
    for o in parsed:
        if o.key_or_group == "hydra.searchpath":
            value = o.value()
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"{o.input_line}: must be a list of folders, e.g. [file://DIR]")
            listed = list(value)
    return search_path.entries(config_dirs, listed)


def _parse(overrides: list[str]) -> list:
    """Hydra's parse of the command line's overrides; one it refuses is a UserError naming
    its key (Hydra's own message names the whole override over several lines)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for given in overrides:
        try:
            parsed += parser.parse_overrides([given])
        except Exception as exc:
            raise UserError(_parse_error(given, exc)) from None
    return parsed


def _parse_error(given: str, exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip() and not line.startswith("See ")]
    lexer = "LexerNoViableAltException: "
    if len(lines) > 1 and lines[0].startswith(lexer):  # a caret under the character refused
        at = len(lines[1]) - 1 - len(lexer)
        reason = f"{given[at]!r} cannot stand there" if 0 <= at < len(given) else lines[0]
    elif len(lines) > 1 and lines[0].startswith("Error parsing override"):
        reason = lines[1].strip()
    else:  # the parser's own words, e.g. "mismatched input '=' expecting <EOF>"
        reason = lines[0].strip() if lines else type(exc).__name__
    key, sep, value = given.partition("=")
    if not sep:
        return f"{given}: not an override ({reason}); write key=value"
    # The shell's quotes around Hydra's: "key='value'" (a value with a ' of its own needs
    # Hydra's double quotes instead, which the shell's single quotes then keep).
    example = f"\"{key}='{value}'\"" if "'" not in value else f"'{key}=\"...\"'"
    return (
        f"{key.lstrip('+~')}={value}: Hydra cannot parse this value ({reason}); quote it "
        f"for Hydra, e.g. {example}"
    )


def preflight(argv: list[str]) -> str | None:
    """Compose and validate every job the command line asks for; UserError on a mistake.
    Configs of one's own (`--config-dir DIR`, `hydra.searchpath=[...]`) are searched as
    Hydra will search them.

    Returns the Hydra folder key (`hydra.run.dir` or `hydra.sweep.dir`) when every job is a
    dry run (cli gives it a temporary folder and no launcher), else None."""
    argv, config_dirs = search_path.split_config_dirs(argv)
    flags = {a.split("=")[0] for a in argv if a.startswith("-")}
    if flags & MULTIRUN_FLAGS and flags & _MODE_FLAGS:
        mode = sorted(flags & _MODE_FLAGS)[-1]
        raise UserError(
            f"{mode} with -m: Hydra takes one mode at a time; drop -m and give one value "
            f"per key to see a job (e.g. `cifar-run batch_size=8 {mode} ...`)"
        )
    if flags & _HYDRA_ONLY_FLAGS:
        return None
    multirun = bool(flags & MULTIRUN_FLAGS)
    overrides = [a for a in argv if not a.startswith("-")]

    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = _parse(overrides)
    task = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    entries = _search_entries(parsed, config_dirs)
    hydra_overrides = [
        o.input_line
        for o in parsed
        if o.key_or_group.startswith("hydra") and o.key_or_group != "hydra.searchpath"
    ]
    options = groups(entries)
    _check_group_choices(task, options)
    sweeps = [o.input_line for o in task if o.is_sweep_override()]
    searchpath = search_path.override(entries)
    # The sweep's own settings: hydra/... overrides, and a search's (hparams_search=...).
    sweep_overrides = hydra_overrides + [o.input_line for o in task if o.key_or_group == SEARCH]
    # Without the launcher and folders, which a dry run does not use (the launcher's plugin
    # may not even be installed here); those are composed once the jobs prove not all dry.
    kept = [o for o in sweep_overrides if not dropped_by_dry_run(o)]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        sweep_cfg = _sweep_config([*kept, *searchpath])
        search = is_search(sweep_cfg)
        varied = {o.key_or_group for o in task if o.is_sweep_override()}
        if search:
            _check_search(sweep_cfg, sweep_overrides, task, multirun)
            varied |= set(sweep_cfg.hydra.sweeper.params or {})
            task = [o for o in task if not o.is_sweep_override()]  # ranges: the search's
        elif sweeps and not multirun:
            raise UserError(f"{sweeps[0]}: several values need multirun; add -m")
        jobs = BasicSweeper.split_arguments(task, None)[0] if task else [[]]
        all_dry = _check_jobs(jobs, options, searchpath, hydra_overrides, multirun, varied)
        if not all_dry:
            sweep_cfg = _sweep_config([*sweep_overrides, *searchpath])
        if multirun and not all_dry:
            sweep_dir = Path(sweep_cfg.hydra.sweep.dir)
            _check_can_create("hydra.sweep.dir", sweep_dir)
            folder_lock.refuse_if_in_use(sweep_dir, "hydra.sweep.dir")  # FolderLock takes it later
            # (A search's rerun continues its study instead: cifar_run.search.study.)
            if not search and any(o.startswith("hydra.sweep.dir=") for o in hydra_overrides):
                _check_completed_jobs(jobs, [*hydra_overrides, *searchpath])
    return ("hydra.sweep.dir" if multirun else "hydra.run.dir") if all_dry else None


def _check_jobs(
    jobs: list[list[str]],
    options: dict[str, list[str]],
    searchpath: list[str],
    hydra_overrides: list[str],
    multirun: bool,
    searched: set[str],
) -> bool:
    """preflight's checks of the composed jobs, inside initialize_config_dir; returns
    whether every job is a dry run. `searched`: the keys a search draws values for."""
    from hydra import compose

    from cifar_run.config.checks import validate

    cfgs = []
    for job in jobs:
        try:
            cfgs.append(compose(config_name="config", overrides=[*job, *searchpath]))
        except Exception as exc:
            base = _base_config(job, options, searchpath)
            raise UserError(_compose_error(exc, job, base)) from None
        _check_added_keys(job, options, searchpath)
        check_loggers(cfgs[-1])  # a missing package or a bad logger key: every job alike
    all_dry = all(cfg.dry_run is True for cfg in cfgs)
    if multirun:
        _refuse_shared_mistake(cfgs, searched)
    else:
        validate(cfgs[0])
        if not cfgs[0].dry_run:
            _check_run_folder(jobs[0], [*hydra_overrides, *searchpath])
    return all_dry


def _refuse_shared_mistake(cfgs: list[DictConfig], searched: set[str]) -> None:
    """In a sweep a bad value fails its own job only and the others still run; a mistake
    that every job shares would fail them one by one, so it is refused here in one line. A
    search's one composed job lacks the drawn values: a mistake in a searched key is left to
    its trials."""
    from cifar_run.config.checks import validate

    first: UserError | None = None
    for cfg in cfgs:
        try:
            validate(cfg)
            return
        except UserError as exc:
            first = first or exc
    assert first is not None
    key = str(first).split("=", 1)[0]
    if not any(key == k or key.startswith(f"{k}.") for k in searched):
        raise first


def _sweep_config(sweep_overrides: list[str]) -> DictConfig:
    """The config with Hydra's settings of the sweep (launcher, sweeper, folders)."""
    from hydra import compose

    try:
        return compose(config_name="config", overrides=sweep_overrides, return_hydra_config=True)
    except Exception as exc:
        raise UserError(_hydra_error(exc)) from None


def _check_search(
    sweep_cfg: DictConfig, sweep_overrides: list[str], task: list, multirun: bool
) -> None:
    """An Optuna search (hydra/sweeper=optuna): multirun, its settings, its search space."""
    if not multirun:
        given = [o for o in sweep_overrides if o.startswith((f"{SEARCH}=", "hydra/sweeper="))]
        raise UserError(
            f"{(given or ['hydra/sweeper=optuna'])[-1]}: a search runs many jobs; add -m"
        )
    check_search(sweep_cfg, [o.input_line for o in task])


def _check_completed_jobs(jobs: list[list[str]], hydra_overrides: list[str]) -> None:
    """A rerun into an existing sweep folder skips the jobs completed there (sweep.run_job).
    Folder names leave out some keys (data.root), so refuse the whole rerun when a completed
    job's config.yaml differs from the job this command would run: skipping it would report
    the old config's results as the new one's. Call inside initialize_config_dir."""
    from hydra import compose
    from omegaconf import open_dict

    from cifar_run.config.data_keys import follow_data
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
        try:
            cfg = follow_data(cfg)  # as run() records it
        except OSError:  # a data folder that is not there: compared as written
            pass
        differences = run_config_diff(folder, cfg)
        if differences:
            raise UserError(
                f"hydra.sweep.dir={sweep_dir}: job {name} there completed with "
                f"another config ({'; '.join(differences[:3])}); a rerun would skip it and "
                "report its results as this config's: choose a new hydra.sweep.dir"
            )
