"""Every conf/model/*.yaml builds, runs forward and backward, and has its documented size."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cifar_run.config.checks import validate
from cifar_run.errors import UserError
from cifar_run.models import build_model, count_parameters
from cifar_run.models.summary import layer_summary

from .conftest import TEST_DATA, TINY, compose_cfg, run_cli

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
MODEL_FILES = sorted(CONF.glob("*.yaml"))

# Exact counts for 10 classes; the published ones are quoted in each YAML's header comment.
EXPECTED_PARAMETERS = {
    "lenet5": 62_006,
    "resnet9": 4_903_242,  # report 001
    "resnet9_page": 6_573_120,  # Page's DAWNBench ResNet-9 (experiment=fast)
    "resnet18": 11_173_962,  # kuangliu/pytorch-cifar
    "resnet18_tv": 11_181_642,  # report 000, torchvision
    "resnet20": 269_722,  # He et al. 2016: 0.27M
    "resnet32": 464_154,  # report 003; He et al.: 0.46M
    "resnet56": 853_018,  # He et al. 2016: 0.85M
    "cnn": 227_594,
    "cnn5": 2_753_546,  # report 002
    "cnn7": 3_238_954,  # report 004 with this project's assumed widths
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny batches: one intra-op thread is ~20x faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# For the CLI subprocesses: the same reason as the fixture above.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def load(name: str, *overrides: str):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


def test_every_model_file_has_an_expected_count():
    assert sorted(p.stem for p in MODEL_FILES) == sorted(EXPECTED_PARAMETERS)


@pytest.mark.parametrize("path", MODEL_FILES, ids=[p.stem for p in MODEL_FILES])
def test_model_builds_trains_and_has_documented_size(path: Path):
    torch.manual_seed(0)
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem, "`name:` must match the file name (model=NAME)"
    assert path.read_text().startswith("#"), "each model file opens with a comment"
    model = build_model(cfg)
    assert count_parameters(model) == EXPECTED_PARAMETERS[path.stem]
    assert f"{EXPECTED_PARAMETERS[path.stem]:,}" in path.read_text(), "count in the header"

    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["lenet5", "resnet56", "cnn7", "resnet18_tv"])
def test_layer_summary_is_short_and_shows_shapes(name: str):
    model = build_model(load(name))
    model.train()
    text = layer_summary(model)
    lines = text.splitlines()
    assert len(lines) <= 30
    assert f"; {EXPECTED_PARAMETERS[name]:,} parameters; " in lines[-1]
    assert "output 10" in lines[-1] and lines[-1].endswith(" FLOPs forward per image")
    assert model.training, "the summary restores the training mode"


def test_layer_summary_counts_flops_of_each_layer_and_in_all():
    # LeNet-5's multiply-adds per image, by hand: conv1 6x28x28 outputs of 3x5x5, conv2
    # 16x10x10 of 6x5x5, then the three linear layers; 2 FLOPs each.
    conv1, conv2 = 6 * 28 * 28 * 3 * 25, 16 * 10 * 10 * 6 * 25
    linear = 400 * 120 + 120 * 84 + 84 * 10
    text = layer_summary(build_model(load("lenet5")))
    rows = {line.split()[0]: line.split()[-1] for line in text.splitlines()[1:-1]}
    assert rows["features.0"] == f"{2 * conv1 / 1e3:.3g}K"
    assert rows["features.3"] == f"{2 * conv2 / 1e3:.3g}K"
    assert rows["features.1"] == "0"
    total = 2 * (conv1 + conv2 + linear)
    assert text.splitlines()[-1].endswith(f"; {total / 1e6:.3g}M FLOPs forward per image")


ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.ELU, nn.SiLU, nn.Tanh)


def _usual_order(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` with every MaxPool2d that comes straight before an activation moved
    back after it (the textbook conv, activation, pool), and how many were moved."""
    usual, moved = copy.deepcopy(model), 0
    for seq in [m for m in usual.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.MaxPool2d) and isinstance(seq[i + 1], ACTIVATIONS):
                seq[i], seq[i + 1] = seq[i + 1], seq[i]
                moved += 1
    return usual, moved


def _train_both(model: nn.Module, usual: nn.Module) -> None:
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, usual)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(16, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (16,), generator=generator)
        for m, optimizer in zip((model, usual), optimizers, strict=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            optimizer.step()


@pytest.mark.parametrize(
    ("name", "overrides", "pools_first"),
    [
        ("lenet5", [], 2),
        ("cnn", [], 3),  # Conv-BN-ReLU-pool
        ("cnn", ["act=leaky_relu", "conv=[8,16]"], 2),
        ("cnn", ["batchnorm=false", "conv=[8,16]"], 2),
        ("cnn", ["pool_type=avg", "conv=[8,16]"], 0),  # averaging does not commute
        ("cnn", ["act=gelu", "conv=[8,16]"], 0),  # nor does a non-monotone activation
        ("cnn", ["bn_after_act=true", "conv=[8,16]"], 0),  # BatchNorm in between
    ],
)
def test_max_pools_run_before_relus_and_train_bit_for_bit_as_the_usual_order(
    name: str, overrides: list[str], pools_first: int
) -> None:
    torch.manual_seed(0)
    model = build_model(load(name, *overrides))
    usual, moved = _usual_order(model)
    assert moved == pools_first, model
    assert model.state_dict().keys() == usual.state_dict().keys()
    initial = copy.deepcopy(model.state_dict())
    _train_both(model, usual)
    for (key, a), b in zip(model.state_dict().items(), usual.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    first_conv = next(k for k in initial if k.endswith("weight"))
    assert not torch.equal(model.state_dict()[first_conv], initial[first_conv]), "trained nothing"


def test_layer_summary_collapses_repeated_blocks():
    text = layer_summary(build_model(load("resnet56")))
    assert "stages.1.1-8" in text and "x8" in text


def test_cnn_command_line_style_overrides_build():
    model = build_model(load("cnn", "conv=[32,64,128]", "fc=[256]"))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [lin.out_features for lin in linears] == [256, 10]


def test_cnn_mapping_entries_and_flatten():
    model = build_model(
        load(
            "cnn",
            "conv=[{ch: 8, k: 5, stride: 2, pool: null}, {ch: 16, pool: [3, 2], dropout2d: 0.1}]",
            "pool_out=null",
            "fc=[{units: 12, dropout: 0.5}]",
            "act=leaky_relu",
            "bn_after_act=true",
        )
    )
    # 32 -> conv k5 s2 p2 -> 16 -> pool 3x2 -> 5x8; 16 * 5 * 8 = 640 features
    assert model.classifier[1].layers[0].in_features == 640
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["conv=[32,0,64]"], r"model\.conv\[1\] \(conv 2\): 0 channels; channels must be"),
        (["conv=[{ch: -4}]"], r"model\.conv\[0\] .*-4 channels"),
        # 32 -> 16 -> 8 -> 4 -> 2 -> 1, then a 2x2 pool of a 1x1 map
        (["conv=[8,8,8,8,8,8]"], r"model\.conv\[5\] .*input is 1x1, pooling 2x2 would leave"),
        (["pool=null", "conv=[{ch: 8, k: 40, pad: 0}]"], r"conv\[0\].*input is 32x32.*40x40"),
        (["conv=[{ch: 8, kernel: 3}]"], r"unknown key 'kernel'; allowed: ch, k,"),
        (["fc=[0]"], r"model\.fc\[0\] \(FC 1\): units=0"),
        (["act=swish"], r"model\.act='swish': allowed: relu"),
        (["fc_dropout=1.5"], r"model\.fc_dropout=1\.5: a dropout probability"),
        (["batchnorm=3"], r"model\.batchnorm=3: must be true or false"),
        (["widht=3"], r"model\.widht: not a key of model 'cnn'; allowed: conv"),
    ],
)
def test_impossible_cnn_fails_at_build_time(overrides, message):
    with pytest.raises(UserError, match=message):
        build_model(load("cnn", *overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["depths=[5,0,5]"], r"model\.depths\[1\]=0: must be an integer >= 1"),
        (["widths=[16,32]"], r"model\.depths has 3 stages but model\.widths has 2"),
        (["widths=[16,8,64]"], r"model\.widths\[1\]=8: shortcut=pad can only add channels"),
        (["shortcut=proj"], r"model\.shortcut='proj': allowed: conv, pad"),
    ],
)
def test_impossible_resnet_fails_at_build_time(overrides, message):
    with pytest.raises(UserError, match=message):
        build_model(load("resnet32", *overrides))


def test_resnet_depths_and_shortcuts_are_configurable():
    # ResNet-110 (He et al.: 1.7M) is one override away; conv shortcuts add 1x1 projections.
    assert count_parameters(build_model(load("resnet20", "depths=[18,18,18]"))) == 1_727_962
    pad = count_parameters(build_model(load("resnet20")))
    conv = count_parameters(build_model(load("resnet20", "shortcut=conv")))
    assert conv - pad == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_dry_run_prints_count_and_layer_table(tmp_path: Path):
    proc = run_cli("model=resnet32", "dry_run=true", cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "\nparameters: 464154\n" in proc.stdout
    table = proc.stdout.split("\nlayers:\n", 1)[1]
    assert "stages.1.1-4  BasicBlock 32->32 s1 x4" in table
    assert "; 464,154 parameters; " in table.rstrip().splitlines()[-1]


def test_impossible_cnn_on_the_command_line_is_one_line_before_data(tmp_path: Path):
    proc = run_cli(
        "model=cnn", "model.conv=[8,8,8,8,8,8]", "data=imagefolder", f"data.root={TEST_DATA}",
        "data.val_size=0.1",
        "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=ONE_THREAD,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cifar-run: error: model.conv[5] (conv 6): input is 1x1, pooling 2x2 would leave "
        "nothing; use a smaller pool or fewer downsampling layers before it"
    ]
    assert "load" not in proc.stdout.lower() + proc.stderr.lower()


# torchvision's pretrained weights: the download itself is replaced (no network in tests);
# what is tested is what cifar-run does with what torchvision returns or raises.
TV_DOWNLOAD = "torchvision.models._api.load_state_dict_from_url"


def _imagenet_state() -> dict[str, torch.Tensor]:
    from torchvision.models import resnet18

    torch.manual_seed(123)
    return resnet18(weights=None).state_dict()  # 1000 classes, as the real file


def test_pretrained_weights_load_with_a_new_classifier(monkeypatch: pytest.MonkeyPatch) -> None:
    state = _imagenet_state()
    monkeypatch.setattr(TV_DOWNLOAD, lambda url, *a, **k: state)
    torch.manual_seed(0)
    model = build_model(
        {"_target_": "cifar_run.models.resnet.torchvision_resnet18", "weights": "IMAGENET1K_V1"}
    )
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert model.fc.out_features == 10 and count_parameters(model) == 11_181_642
    torch.manual_seed(0)
    again = build_model(
        {"_target_": "cifar_run.models.resnet.torchvision_resnet18", "weights": "DEFAULT"}
    )
    assert torch.equal(again.fc.weight, model.fc.weight)  # the new head is seeded


def test_failed_download_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.error import URLError

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(TV_DOWNLOAD, offline)
    spec = {"_target_": "cifar_run.models.resnet.torchvision_resnet18", "weights": "DEFAULT"}
    with pytest.raises(UserError) as info:
        build_model(spec)
    message = str(info.value)
    assert message.startswith("model.weights=DEFAULT: cannot load torchvision's ImageNet")
    assert "Name or service not known" in message and "model.weights=null" in message
    assert "\n" not in message


def test_unknown_weights_name_lists_the_choices() -> None:
    spec = {"_target_": "cifar_run.models.resnet.torchvision_resnet18", "weights": "imagenet"}
    with pytest.raises(UserError, match="model.weights=imagenet: unknown; allowed: null, DEFAULT"):
        build_model(spec)


def test_config_checks_never_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """validate() builds the model on the meta device to check the pruning selection."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("downloaded during validation")

    monkeypatch.setattr(TV_DOWNLOAD, refuse)
    validate(compose_cfg([*TINY, "model=resnet18_tv", "model.weights=DEFAULT", "prune=0.5"]))
