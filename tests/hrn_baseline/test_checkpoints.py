"""Public checkpoints (Deep3DFaceRecon `epoch_20.pth`, HRN `epoch_10.pth`): strict loading, the
round trip through `export_public`, and one-line errors naming a wrong key.

The public state dicts are built here from the layouts' key and shape lists (random values), not
from the toolkit's modules, so a difference between the two architectures fails the tests."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from click.testing import CliRunner

from facehd.errors import FileFormatError, InputError
from hrn_baseline import checkpoints as ck
from hrn_baseline.cli import main
from hrn_baseline.config import ModelConfig
from hrn_baseline.model import HRN, load_hrn_morphable

# ResNet-50 (torchvision Bottleneck): blocks per layer, bottleneck widths; expansion 4
RESNET50_LAYERS = ((3, 64), (4, 128), (6, 256), (3, 512))
HEADS = (80, 64, 80, 3, 27, 2, 1)  # id, exp, tex, angle, gamma, (tx, ty), tz
GENERATOR_BLOCKS, NGF = 9, 64


def _bn(prefix: str, channels: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,), f"{prefix}.running_mean": (channels,),
            f"{prefix}.running_var": (channels,), f"{prefix}.num_batches_tracked": ()}


def net_recon_layout() -> dict[str, tuple]:
    """Deep3DFaceRecon's `ReconNetWrapper(resnet50, use_last_fc=False)` keys and shapes."""
    keys = {"backbone.conv1.weight": (64, 3, 7, 7), **_bn("backbone.bn1", 64)}
    channels = 64
    for layer, (blocks, width) in enumerate(RESNET50_LAYERS, start=1):
        for block in range(blocks):
            p = f"backbone.layer{layer}.{block}"
            keys[f"{p}.conv1.weight"] = (width, channels, 1, 1)
            keys.update(_bn(f"{p}.bn1", width))
            keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
            keys.update(_bn(f"{p}.bn2", width))
            keys[f"{p}.conv3.weight"] = (4 * width, width, 1, 1)
            keys.update(_bn(f"{p}.bn3", 4 * width))
            if block == 0:
                keys[f"{p}.downsample.0.weight"] = (4 * width, channels, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", 4 * width))
            channels = 4 * width
    for i, k in enumerate(HEADS):
        keys[f"final_layers.{i}.weight"] = (k, 2048, 1, 1)
        keys[f"final_layers.{i}.bias"] = (k,)
    return keys


def generator_layout(in_channels: int, out_channels: int) -> dict[str, tuple]:
    """pix2pix `ResnetGenerator(ngf 64, instance norm, dropout, 9 blocks)` keys and shapes."""
    keys = {"model.1.weight": (64, in_channels, 7, 7), "model.1.bias": (64,),
            "model.4.weight": (128, 64, 3, 3), "model.4.bias": (128,),
            "model.7.weight": (256, 128, 3, 3), "model.7.bias": (256,)}
    for b in range(GENERATOR_BLOCKS):
        for conv in (1, 6):  # with dropout the second convolution is conv_block.6
            keys[f"model.{10 + b}.conv_block.{conv}.weight"] = (256, 256, 3, 3)
            keys[f"model.{10 + b}.conv_block.{conv}.bias"] = (256,)
    keys.update({"model.19.weight": (256, 128, 3, 3), "model.19.bias": (128,),  # ConvTranspose2d: (in, out)
                 "model.22.weight": (128, 64, 3, 3), "model.22.bias": (64,),
                 "model.26.weight": (out_channels, 64, 7, 7), "model.26.bias": (out_channels,)})
    return keys


def _random(layout: dict[str, tuple], gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(0, 1000, shape, generator=gen)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.02
    return state


def _params(layout: dict[str, tuple], trainable_only: bool = True) -> int:
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(torch.Size(s).numel() for k, s in layout.items() if not (trainable_only and k.endswith(skip)))


def test_the_layouts_are_the_published_ones():
    """The key and parameter counts the public modules give (instantiated with torch)."""
    recon = net_recon_layout()
    assert len(recon) == 332 and _params(recon) == 24_034_625
    mid, high = generator_layout(6, 3), generator_layout(9, 1)
    assert len(mid) == len(high) == 48
    assert _params(mid) == 11_387_587 and _params(high) == 11_390_721


@pytest.fixture(scope="module")
def public_hrn() -> dict:
    """An HRN `epoch_10.pth` dict with random weights and the training states beside them."""
    gen = torch.Generator().manual_seed(0)
    return {"net_recon": _random(net_recon_layout(), gen), "mid_net": _random(generator_layout(6, 3), gen),
            "high_net": _random(generator_layout(9, 1), gen), "alpha": torch.tensor([0.013]),
            "beta": torch.tensor([0.021]), "opt_00": {"state": {}, "param_groups": []},
            "sched_00": {"last_epoch": 10}}


# the public networks on a small morphable model and small maps: the weights do not depend on them
SMALL_MAPS = dict(synth_resolution=24, image_size=64, mid_map_size=16, high_map_size=32)


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig(**SMALL_MAPS)


@pytest.fixture(scope="module")
def hrn_file(tmp_path_factory, public_hrn):
    path = tmp_path_factory.mktemp("public") / "epoch_10.pth"
    torch.save(public_hrn, path)
    return path


def _outputs(model: HRN) -> list[torch.Tensor]:
    """The three networks on fixed small inputs (the generators are fully convolutional)."""
    gen = torch.Generator().manual_seed(1)
    model.eval()
    with torch.no_grad():
        image = torch.rand(1, 3, 64, 64, generator=gen)
        maps = [torch.rand(1, c, 16, 16, generator=gen) for c in (3, 3, 3)]
        mask = torch.ones(1, 1, 16, 16)
        return [model.regressor(image), model.mid_net(maps[0], maps[1], mask),
                model.high_net(maps[0], maps[1], maps[2], mask)]


def test_hrn_checkpoint_loads_strictly_and_round_trips(tmp_path, hrn_file, public_hrn, config):
    model = ck.model_from_checkpoint(hrn_file, config)
    state = model.state_dict()
    for name, prefix in ck.PUBLIC_NETS.items():
        for key, value in public_hrn[name].items():
            assert torch.equal(state[prefix + key], value), prefix + key
    assert model.mid_net.alpha.item() == pytest.approx(0.013) and model.high_net.beta.item() == pytest.approx(0.021)
    before = _outputs(model)

    exported = ck.export_public(model, tmp_path / "exported.pth")
    written = torch.load(exported, weights_only=True)
    assert set(written) == {"net_recon", "mid_net", "high_net", "alpha", "beta"}
    for name in ck.PUBLIC_NETS:
        assert set(written[name]) == set(public_hrn[name])
        assert all(torch.equal(written[name][k], v) for k, v in public_hrn[name].items())
    assert written["alpha"].shape == (1,) and torch.equal(written["alpha"], public_hrn["alpha"])

    again = ck.model_from_checkpoint(exported, config)
    for a, b in zip(before, _outputs(again)):
        assert torch.equal(a, b)


def test_deep3d_checkpoint_loads_the_regressor_only(tmp_path, public_hrn, config):
    path = tmp_path / "epoch_20.pth"
    torch.save({"net_recon": public_hrn["net_recon"], "opt_00": {}, "sched_00": {}}, path)
    assert ck.read_checkpoint(path)[0] == ck.DEEP3D
    torch.manual_seed(3)
    model = ck.model_from_checkpoint(path, config)
    torch.manual_seed(3)
    fresh = HRN(load_hrn_morphable(config), config)  # the detail nets keep their initialisation
    assert torch.equal(model.regressor.final_layers[6].weight, public_hrn["net_recon"]["final_layers.6.weight"])
    assert torch.equal(model.mid_net.generator.model[1].weight, fresh.mid_net.generator.model[1].weight)
    exported = ck.export_public(model, tmp_path / "recon.pth", kind=ck.DEEP3D)
    assert set(torch.load(exported, weights_only=True)) == {"net_recon"}


@pytest.mark.parametrize("net, old, new", [
    ("net_recon", "backbone.layer3.5.conv2.weight", "backbone.layer3.5.conv2.weights"),
    ("mid_net", "model.14.conv_block.6.weight", "model.14.conv_block.5.weight"),
])
def test_a_renamed_key_is_a_one_line_error_naming_it(tmp_path, public_hrn, config, net, old, new):
    state = dict(public_hrn)
    state[net] = {(new if k == old else k): v for k, v in public_hrn[net].items()}
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(FileFormatError) as err:
        ck.model_from_checkpoint(path, config)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and net in message
    assert f"missing key {old}" in message and f"unexpected key {new}" in message


@pytest.fixture(scope="module")
def model_state(config) -> dict[str, torch.Tensor]:
    return HRN(load_hrn_morphable(config), config).state_dict()


def test_other_layout_errors(public_hrn, model_state, config):
    wide_head = {**public_hrn["net_recon"], "final_layers.0.weight": torch.zeros(81, 2048, 1, 1)}
    cases = {
        "wrong shape of final_layers.0.weight ((81, 2048, 1, 1) in the file, (80, 2048, 1, 1) in the model)":
            {**public_hrn, "net_recon": wide_head},
        "HRN checkpoint without beta": {k: v for k, v in public_hrn.items() if k != "beta"},
        "unexpected top-level entry 'net_D'": {**public_hrn, "net_D": {}},
        "not an HRN checkpoint": {"generator": {}},  # the de-retouching network's file
    }
    for expected, state in cases.items():
        with pytest.raises(FileFormatError, match=re.escape(expected)):
            ck.public_to_state(state, model_state, "epoch_10.pth")
    # the public generators have dropout; without it the second convolution is conv_block.5
    no_dropout = HRN(load_hrn_morphable(config), dataclasses.replace(config, dropout=False)).state_dict()
    with pytest.raises(FileFormatError, match="mid_net .*missing keys .*conv_block.6.*paper's sizes"):
        ck.public_to_state(public_hrn, no_dropout, "epoch_10.pth")


def test_init_from_loads_public_and_own_checkpoints(tmp_path, hrn_file, public_hrn, config, tiny_checkpoint):
    model = HRN(load_hrn_morphable(config), config)
    assert ck.load_weights_into(model, hrn_file) == ck.HRN_PUBLIC
    assert torch.equal(model.high_net.generator.model[26].bias, public_hrn["high_net"]["model.26.bias"])
    own = ck.model_from_checkpoint(tiny_checkpoint)
    target = HRN(own.morphable, own.config)
    assert ck.load_weights_into(target, tiny_checkpoint) == ck.FACEHD
    for a, b in zip(own.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileFormatError, match="does not match"):  # the tiny sizes are not the public ones
        ck.load_weights_into(target, hrn_file)
    with pytest.raises(InputError, match="not the public ones"):
        ck.export_public(own, tmp_path / "x.pth")
    assert ck.CHECKPOINT_FORMAT == __import__("hrn_baseline.train", fromlist=["x"]).CHECKPOINT_FORMAT


def test_export_checkpoint_command(tmp_path, hrn_file, public_hrn, config):
    cfg = tmp_path / "model.yaml"
    cfg.write_text("model:\n" + "".join(f"  {k}: {v}\n" for k, v in SMALL_MAPS.items()))
    out = tmp_path / "out.pth"
    result = CliRunner().invoke(main, ["export-checkpoint", "--checkpoint", str(hrn_file), "--config", str(cfg),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout
    written = torch.load(out, weights_only=True)
    assert torch.equal(written["mid_net"]["model.1.weight"], public_hrn["mid_net"]["model.1.weight"])
    bad = CliRunner().invoke(main, ["export-checkpoint", "--checkpoint", str(tmp_path / "none.pth"), "--out",
                                    str(out)])
    assert bad.exit_code != 0 and "no such checkpoint" in bad.output and "Traceback" not in bad.output


def test_train_starts_from_init_from(tmp_path, tiny_wild, tiny_checkpoint):
    """`model.init_from` gives the run's first weights (lr 0: they are still there after a step)."""
    from hrn_factory import tiny_config

    from hrn_baseline.train import train

    config = tiny_config(tmp_path / "run", tiny_wild, steps=1)
    config.model.init_from = str(tiny_checkpoint)
    config.optim.lr = 0.0
    written = torch.load(train(config).last_checkpoint, weights_only=True)["model"]
    start = torch.load(tiny_checkpoint, weights_only=True)["model"]
    for key in ("regressor.final_layers.0.weight", "mid_net.generator.model.1.weight", "high_net.beta"):
        assert torch.equal(written[key], start[key]), key
