"""The reports' published figures in their experiment configs, and the sweep summary that
sets our runs beside them (reference.md, reference.csv)."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf, open_dict

from cifar_run.config.compare import config_diff, config_hash
from cifar_run.config.compose import CONF_DIR
from cifar_run.config.reference import Reference, parse_reference
from cifar_run.errors import UserError
from cifar_run.outputs.run_folders import load_runs
from cifar_run.outputs.summary import summarize, write_summary

from .conftest import TEST_DATA, compose_cfg, one_line, read_results, run_cli, run_report
from .test_report import make_run, make_sweep

# Report 000's Table 1 as the report prints it (../shared/seeds/000_fa2c2f007abad5c0.txt):
# batch size, model, pruned -> validation %, test %.
TABLE_1 = {
    (64, "resnet18_tv", False): (73.34, 72.67),
    (64, "resnet18_tv", True): (84.19, 83.93),
    (64, "lenet5", False): (60.83, 61.21),
    (64, "lenet5", True): (61.64, 60.88),
    (32, "resnet18_tv", False): (76.75, 76.72),
    (32, "resnet18_tv", True): (86.50, 86.53),
    (32, "lenet5", False): (62.44, 62.76),
    (32, "lenet5", True): (61.15, 60.77),
    (16, "resnet18_tv", False): (79.95, 80.38),
    (16, "resnet18_tv", True): (84.88, 85.04),
    (16, "lenet5", False): (59.61, 60.51),
    (16, "lenet5", True): (52.47, 54.09),
    (8, "resnet18_tv", False): (84.98, 84.83),
    (8, "resnet18_tv", True): (84.64, 84.37),
    (8, "lenet5", False): (59.33, 59.18),
    (8, "lenet5", True): (57.62, 57.09),
}
# The other reports' figures (percent): validation, test.
FIGURES = {
    "report001": (None, 92.0),
    "report002": (None, 84.0),
    "report003": (87.16, 86.77),
    "report004": (None, 85.65),
}


def reference(name: str) -> Reference:
    found = parse_reference(compose_cfg([f"experiment={name}"]).get("reference"))
    assert found is not None, name
    return found


def test_report000_quotes_every_row_of_its_table_1() -> None:
    ref = reference("report000")
    quoted = {
        (r.match["batch_size"], r.match["model"], r.match["pruned"]): (
            r.figures["val_acc"],
            r.figures["test_acc"],
        )
        for r in ref.rows
    }
    assert len(ref.rows) == 16 and quoted == TABLE_1
    assert ref.report == "000" and (ref.row_keys, ref.column_keys) == (
        ("batch_size",),
        ("model", "pruned"),
    )
    models = {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}
    assert {r.match["model"] for r in ref.rows} <= models
    assert all(r.source.startswith("Table 1") for r in ref.rows)
    cfg = compose_cfg(["experiment=report000"])
    assert ref.setup and all(OmegaConf.select(cfg, k) == v for k, v in ref.setup.items())


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_the_other_reports_quote_their_figure_and_where_it_stands(name: str) -> None:
    ref = reference(name)
    assert ref.report == name[-3:] and len(ref.rows) == 1 and ref.rows[0].source.strip()
    val, test = FIGURES[name]
    assert ref.rows[0].figures == {
        k: v for k, v in (("val_acc", val), ("test_acc", test)) if v is not None
    }
    # The experiment's own settings land on the row it quotes.
    cfg = compose_cfg([f"experiment={name}"])
    assert all(cfg[k] == v for k, v in ref.rows[0].match.items())
    assert ref.setup and all(OmegaConf.select(cfg, k) == v for k, v in ref.setup.items())


def test_the_reference_block_changes_nothing_a_run_computes() -> None:
    cfg = compose_cfg(["experiment=report000"])
    other = cfg.copy()
    with open_dict(other):
        del other["reference"]
    assert config_hash(cfg) == config_hash(other)  # a checkpoint's resume check
    saved = OmegaConf.to_container(cfg, resolve=True)
    assert config_diff(saved, other) == []  # a run folder's config.yaml against a rerun
    with open_dict(other):
        other.lr = 0.1
    assert config_diff(saved, other) == ["lr: 0.0153 -> 0.1"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"report": 0}, 'reference.report=0: must be text; quote it ("000")'),
        ({"rows": []}, "reference.rows=[]: must be a non-empty list"),
        ({"rows": [{"lr": 0.1, "source": "x"}]}, "reference.rows[0]: gives no figure"),
        ({"rows": [{"test_acc": 101, "source": "x"}]}, "reference.rows[0].test_acc=101: must be"),
        ({"rows": [{"test_acc": 80}]}, "reference.rows[0].source=None: must be a non-empty"),
        ({"rows": [{"test_acc": 80, "source": "x", "lr": [1]}]}, "reference.rows[0].lr=[1]"),
        ({"colour": "red"}, "reference.colour: unknown key; allowed: report,"),
        ({"table": {"rows": "batch_size"}}, "reference.table.rows=batch_size: must be a list"),
        ({"setup": {"data": {"val_size": [1, 2]}}}, "reference.setup.data.val_size=[1, 2]"),
    ],
)
def test_a_bad_reference_block_names_the_key(change: dict, message: str) -> None:
    block = {"report": "009", "rows": [{"test_acc": 80.0, "source": "Table 2"}], **change}
    with pytest.raises(UserError) as err:
        parse_reference(block)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reference.report=5", 'reference.report=5: must be text; quote it ("005")'),
        ("reference.rows=[]", "reference.rows=[]: must be a non-empty list of figures"),
    ],
)
def test_a_bad_reference_stops_the_run_before_training(
    tmp_path: Path, override: str, message: str
) -> None:
    proc = run_cli("experiment=report003", override, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in one_line(proc.stderr)
    assert not (tmp_path / "outputs").exists()


# A report000-shaped sweep of fake run folders: model x batch size x seed, dense and pruned.

MODELS = ("lenet5", "resnet18_tv")
BATCHES = (8, 16, 32, 64)
SEEDS = (0, 1)
JPEG_ROOT = "../shared/data/cifar10-jpeg"


def fake_acc(model: str, batch: int, pruned: bool, seed: int, figure: str) -> float:
    """Made-up accuracies that differ by every key, the seed included."""
    base = 55.0 + 10 * MODELS.index(model) + batch / 16 - 2.5 * pruned
    return base + 0.9 * seed + (0.4 if figure == "val_acc" else -0.3 * seed)


def _runs_folder(tmp_path: Path, where: str) -> Path:
    """The sweep; the reference block in results.json (as cifar-run writes it) or only in
    config.yaml (`where`)."""
    fixed = ["experiment=report000", "data=imagefolder", f"data.root={JPEG_ROOT}"]
    task = [*fixed, f"model={','.join(MODELS)}", "batch_size=8,16,32,64", "seed=0,1"]
    sweep = make_sweep(tmp_path / "sweep", task)
    for num, (model, batch, seed) in enumerate(itertools.product(MODELS, BATCHES, SEEDS)):
        overrides = [*fixed, f"model={model}", f"batch_size={batch}", f"seed={seed}"]
        cfg = compose_cfg(overrides)
        rows = [
            {
                "model": model,
                "batch_size": batch,
                "seed": seed,
                "pruned": pruned,
                "best_val_acc": fake_acc(model, batch, pruned, seed, "val_acc"),
                "test_acc": fake_acc(model, batch, pruned, seed, "test_acc"),
            }
            for pruned in (False, True)
        ]
        extra = {"reference": OmegaConf.to_container(cfg.reference)} if where == "results" else {}
        folder = sweep / f"{num}_batch_size={batch},model={model},seed={seed}"
        make_run(folder, overrides, rows[0]["test_acc"], rows=rows, data="imagefolder", **extra)
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return sweep


def md_table(text: str) -> list[list[str]]:
    """The first Markdown table in text, as rows of cells (the separator line left out)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [
        [c.strip() for c in line.strip("|").split(" | ")] for line in lines if "---" not in line
    ]


@pytest.mark.parametrize("where", ["results", "config"])
def test_report000_sweep_is_tabled_beside_table_1(tmp_path: Path, where: str) -> None:
    sweep = _runs_folder(tmp_path, where)
    proc = run_report(str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    md = (sweep / "reference.md").read_text()
    assert md in proc.stdout and "reference.md" in proc.stderr
    header, *rows = md_table(md)
    assert header[0] == "batch_size" and len(header) == 1 + 2 * 2 * 2 * 3
    assert [row[0] for row in rows] == ["64", "32", "16", "8"]  # the report's order
    assert header[1:4] == ["resnet18_tv dense val ours", "report", "diff"]
    csv = pd.read_csv(sweep / "reference.csv")
    assert len(csv) == 16 * 2 and (csv["runs"] == len(SEEDS)).all()
    for (batch, model, pruned), (val, test) in TABLE_1.items():
        row = rows[[r[0] for r in rows].index(str(batch))]
        for figure, reported in (("val_acc", val), ("test_acc", test)):
            ours = [fake_acc(model, batch, pruned, s, figure) for s in SEEDS]
            mean, sd = statistics.mean(ours), statistics.stdev(ours)
            kind = "pruned" if pruned else "dense"
            col = header.index(f"{model} {kind} {'val' if figure == 'val_acc' else 'test'} ours")
            assert row[col : col + 3] == [
                f"{mean:.2f} ± {sd:.2f}",
                f"{reported:.2f}",
                f"{mean - reported:+.2f}",
            ]
            (line,) = csv[
                (csv["batch_size"] == batch)
                & (csv["model"] == model)
                & (csv["pruned"] == pruned)
                & (csv["figure"] == figure)
            ].itertuples()
            assert line.ours_mean == pytest.approx(mean) and line.ours_std == pytest.approx(sd)
            assert line.reported == reported and line.diff == pytest.approx(mean - reported)
            assert line.source == "Table 1"
    title, _, notes = md.split("\n\n")
    assert title.startswith("Report 000") and "seeds/000_" in title
    assert "mean ± standard deviation over the 2 runs of each setting (seed 0, 1)" in notes
    assert "trained its pruned models apart from its dense ones" in notes
    assert (
        f"16 of 16 runs trained and tested on the JPEG copy of CIFAR-10 (data.root={JPEG_ROOT})"
        in notes
    )
    assert "3.4 points" in notes and "not the report's setup" not in notes


def test_no_reference_files_for_runs_without_a_report(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path / "sweep", ["lr=0.01,0.1"])
    for num, lr in enumerate((0.01, 0.1)):
        make_run(sweep / f"{num}_lr={lr}", [f"lr={lr}"], 50.0 + num)
    summary = summarize(load_runs([sweep]))
    written = write_summary(summary, sweep)
    assert summary.reference_markdown() is None and summary.comparisons == []
    assert not list(sweep.glob("reference.*")) and all(p.is_file() for p in written)


@pytest.mark.slow  # a real sweep of 4 tiny jobs
def test_a_real_report002_sweep_ends_with_its_reference_table(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "experiment=report002",
        "data=imagefolder",
        f"data.root={TEST_DATA}",
        "data.subset=10",
        "data.val_size=0.1",
        "epochs=1",
        "device=cpu",
        "lr=0.0005,0.001",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (sweep / "reference.md").read_text()
    assert md in proc.stdout  # printed at the end of the sweep, as the summary table is
    jobs = sorted(p for p in sweep.iterdir() if (p / "results.json").is_file())
    results = [read_results(j) for j in jobs]
    assert len(results) == 4 and all(r["reference"]["report"] == "002" for r in results)

    (quoted,) = reference("report002").rows
    ours = [r["test_acc"] for r in results if r["lr"] == quoted.match["lr"]]
    mean, sd = statistics.mean(ours), statistics.stdev(ours)
    header, best, other = md_table(md)
    assert header == ["lr", "test ours", "test report", "test diff", "runs", "source"]
    reported = quoted.figures["test_acc"]
    assert best == [
        "0.0005",
        f"{mean:.2f} ± {sd:.2f}",
        f"{reported:.2f}",
        f"{mean - reported:+.2f}",
        "2",
        quoted.source,
    ]
    assert other[0] == "0.001" and other[2:4] == ["-", "-"]  # the report has no such row
    csv = pd.read_csv(sweep / "reference.csv").set_index("lr")
    assert csv.loc[0.0005, "ours_mean"] == pytest.approx(mean)
    assert csv.loc[0.0005, "reported"] == reported and pd.isna(csv.loc[0.001, "reported"])
    assert "epochs=1 (4 of 4 runs) where the report has 20" in md
    assert "data.subset=10 (4 of 4 runs) where the report has null" in md
    assert f"4 of 4 runs used the image folder data.root={TEST_DATA}" in md
