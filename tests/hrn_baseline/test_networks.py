import pytest
import torch
from helpers import assert_close
from torch import nn

from facehd.errors import FileFormatError, InputError
from facehd.morphable import split_coeffs
from hrn_baseline.face_recognition import IRESNET_LAYERS, FaceRecognizer, IResNet
from hrn_baseline.networks import (
    BaseRegressor,
    HighDetailNet,
    MidDetailNet,
    PatchDiscriminator,
    ResnetBlock,
    ResnetGenerator,
    init_weights,
)

# small configurations keep the suite fast on two CPU cores
NGF, BLOCKS = 8, 2


def _maps(b, c, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, size, size, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------------
# base regressor


def test_base_regressor_is_zero_at_init_and_orders_its_heads():
    torch.manual_seed(0)
    net = BaseRegressor("resnet18").eval()
    out = net(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 257)
    assert torch.count_nonzero(out) == 0  # zero-initialised heads predict the mean face
    with torch.no_grad():
        for k, head in enumerate(net.final_layers):
            head.bias.fill_(k + 1)
    c = split_coeffs(net(torch.rand(1, 3, 32, 32)))
    for k, group in enumerate([c.id, c.exp, c.tex, c.angle, c.gamma]):
        assert torch.all(group == k + 1)
    assert c.trans.tolist() == [[6.0, 6.0, 7.0]]  # (tx, ty) head then tz head


def test_base_regressor_heads_receive_gradients():
    torch.manual_seed(0)
    net = BaseRegressor("resnet18")
    net(torch.rand(2, 3, 32, 32))[:, 0].sum().backward()
    assert net.final_layers[0].weight.grad.abs().sum() > 0
    assert net.final_layers[1].weight.grad.abs().sum() == 0


def test_base_regressor_default_is_resnet50_with_deep3d_key_names():
    net = BaseRegressor()
    assert net.final_layers[0].in_channels == 2048
    assert [h.out_channels for h in net.final_layers] == [80, 64, 80, 3, 27, 2, 1]
    keys = net.state_dict().keys()
    assert "backbone.layer4.2.conv3.weight" in keys and "final_layers.6.bias" in keys
    assert not any(k.startswith("backbone.fc") for k in keys)


def test_base_regressor_loads_backbone_weights(tmp_path):
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)  # with the ImageNet classifier `fc.*`, which is ignored
    net = BaseRegressor("resnet18", backbone_weights=path)
    assert_close(net.backbone.conv1.weight, source.conv1.weight, atol=0, rtol=0)
    assert_close(net.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var, atol=0, rtol=0)


def test_base_regressor_weight_errors_name_the_file(tmp_path):
    bad = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(FileFormatError, match="wrong.pth.*missing keys"):
        BaseRegressor("resnet18", backbone_weights=bad)
    with pytest.raises(FileFormatError, match="absent.pth"):
        BaseRegressor("resnet18", backbone_weights=tmp_path / "absent.pth")
    with pytest.raises(InputError, match="unknown backbone"):
        BaseRegressor("vgg16")
    not_weights = tmp_path / "config.yaml"
    not_weights.write_text("model:\n  backbone: resnet50\n")
    with pytest.raises(FileFormatError, match="config.yaml") as caught:
        BaseRegressor("resnet18", backbone_weights=not_weights)
    assert "\n" not in str(caught.value)  # one line, not PyTorch's weights_only explanation


def test_base_regressor_rejects_bad_images():
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        BaseRegressor("resnet18")(torch.rand(2, 1, 32, 32))


# ----------------------------------------------------------------------------------------------
# generators


def test_resnet_generator_defaults_follow_pix2pix():
    net = ResnetGenerator(6, 3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 64 and convs[0].kernel_size == (7, 7)
    assert sum(isinstance(m, ResnetBlock) for m in net.modules()) == 9
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in net.modules()) == 2
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(not n.affine and not n.track_running_stats for n in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert sum(isinstance(m, nn.ReflectionPad2d) for m in net.modules()) == 2 + 2 * 9
    assert isinstance(net.model[-1], nn.Tanh)


@pytest.mark.parametrize("size", [64, 256])
def test_resnet_generator_shapes_and_range(size):
    torch.manual_seed(0)
    out = ResnetGenerator(9, 2, ngf=NGF, n_blocks=BLOCKS)(_maps(2, 9, size, 0))
    assert out.shape == (2, 2, size, size)
    assert out.abs().max() < 1


def test_mid_detail_net_scales_the_generator_output():
    torch.manual_seed(0)
    net = MidDetailNet(ngf=NGF, n_blocks=BLOCKS).eval()
    pos, tex = _maps(2, 3, 64, 1), _maps(2, 3, 64, 2)
    mask = torch.ones(2, 1, 64, 64)
    mask[:, :, :20] = 0
    out = net(pos, tex, mask)
    assert out.shape == (2, 3, 64, 64)
    # exactly tanh-generator * 0.1 * alpha * mask: no second tanh
    assert_close(out, net.generator(torch.cat([pos, tex], 1)) * 0.1 * net.alpha * mask, atol=1e-7)
    assert torch.count_nonzero(out[:, :, :20]) == 0
    assert 0 < out.abs().max() <= 0.1 * net.alpha


def test_high_detail_net_upsamples_the_deformation_map():
    torch.manual_seed(0)
    net = HighDetailNet(ngf=NGF, n_blocks=BLOCKS).eval()
    pos, tex, deform = _maps(1, 3, 256, 1), _maps(1, 3, 256, 2), _maps(1, 3, 64, 3) * 0.001
    mask = (torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(4)) > 0.3).float()
    out = net(pos, tex, deform, mask)
    assert out.shape == (1, 1, 256, 256)
    up = torch.nn.functional.interpolate(deform, size=(256, 256), mode="bilinear", align_corners=False)
    assert_close(out, net(pos, tex, up, mask), atol=0, rtol=0)
    assert torch.count_nonzero(out[mask == 0]) == 0
    assert 0 < out.abs().max() <= 0.1 * net.beta


def test_alpha_and_beta_are_parameters_that_learn():
    torch.manual_seed(0)
    mid, high = MidDetailNet(ngf=NGF, n_blocks=BLOCKS), HighDetailNet(ngf=NGF, n_blocks=BLOCKS)
    assert dict(mid.named_parameters())["alpha"].item() == pytest.approx(0.01)
    assert dict(high.named_parameters())["beta"].item() == pytest.approx(0.01)
    mid_out = mid(_maps(1, 3, 64, 1), _maps(1, 3, 64, 2), torch.ones(1, 1, 64, 64))
    high_out = high(_maps(1, 3, 64, 1), _maps(1, 3, 64, 2), mid_out, torch.ones(1, 1, 64, 64))
    (mid_out.sum() + high_out.sum()).backward()
    assert mid.alpha.grad.abs() > 0 and high.beta.grad.abs() > 0


def test_detail_nets_use_dropout_like_hrn_unless_disabled():
    assert any(isinstance(m, nn.Dropout) for m in MidDetailNet(ngf=NGF, n_blocks=BLOCKS).modules())
    assert not any(isinstance(m, nn.Dropout) for m in MidDetailNet(ngf=NGF, n_blocks=BLOCKS,
                                                                   use_dropout=False).modules())


def test_detail_nets_reject_mismatched_inputs():
    net = MidDetailNet(ngf=NGF, n_blocks=BLOCKS)
    with pytest.raises(InputError, match="valid_mask"):
        net(_maps(1, 3, 64, 1), _maps(1, 3, 64, 2), torch.ones(1, 1, 32, 32))
    with pytest.raises(InputError, match="inputs"):
        net(_maps(1, 3, 64, 1), _maps(1, 1, 64, 2), torch.ones(1, 1, 64, 64))


# ----------------------------------------------------------------------------------------------
# discriminator and initialisation


@pytest.mark.parametrize(("size", "side"), [(64, 6), (256, 30)])
def test_patch_discriminator_output_shape(size, side):
    torch.manual_seed(0)
    net = PatchDiscriminator(4, ndf=NGF)
    assert net(_maps(2, 4, size, 0)).shape == (2, 1, side, side)


def test_patch_discriminator_layout():
    net = PatchDiscriminator(3)
    convs = [m for m in net.model if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert isinstance(net.model[1], nn.LeakyReLU) and net.model[1].negative_slope == 0.2  # no norm first
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 3
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in PatchDiscriminator(3, norm="instance").modules()) == 3


def test_init_weights_normal():
    net = nn.Sequential(nn.Conv2d(64, 64, 3), nn.BatchNorm2d(4096), nn.Linear(3, 3))
    init_weights(net, "normal", gain=0.02, generator=torch.Generator().manual_seed(0))
    w = net[0].weight
    assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.02, rel=0.05)
    assert net[1].weight.mean().item() == pytest.approx(1.0, abs=1e-3)
    assert net[1].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(net[0].bias) == torch.count_nonzero(net[1].bias) == 0
    again = init_weights(nn.Sequential(nn.Conv2d(64, 64, 3)), generator=torch.Generator().manual_seed(0))
    assert_close(again[0].weight, w, atol=0, rtol=0)
    with pytest.raises(InputError):
        init_weights(net, "uniform")


# ----------------------------------------------------------------------------------------------
# face recogniser


def test_small_random_recognizer_is_frozen_deterministic_and_unit_norm():
    crops = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0), requires_grad=True)
    rec = FaceRecognizer.small_random(seed=5).train()
    assert not rec.net.training and not any(p.requires_grad for p in rec.parameters())
    feats = rec(crops)
    assert feats.shape == (3, 64)
    assert_close(feats.norm(dim=-1), torch.ones(3))
    assert_close(FaceRecognizer.small_random(seed=5)(crops), feats, atol=0, rtol=0)
    assert not torch.allclose(FaceRecognizer.small_random(seed=6)(crops), feats)
    feats[:, 0].sum().backward()
    assert crops.grad.abs().sum() > 0
    with pytest.raises(InputError, match="112"):
        rec(torch.rand(1, 3, 64, 64))


def test_iresnet50_layout():
    net = IResNet()  # the forward pass at 112^2 -> 512 is checked on iresnet18 below
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 14, 3]
    assert (net.fc.in_features, net.fc.out_features) == (512 * 7 * 7, 512)


def test_recognizer_from_file_round_trips_fp16_weights(tmp_path):
    torch.manual_seed(0)
    source = IResNet(IRESNET_LAYERS["iresnet18"])
    path = tmp_path / "backbone.pth"
    # arcface_torch's `*_fp16` checkpoints are saved in half precision, with a DataParallel prefix here
    torch.save({f"module.{k}": v.half() if v.is_floating_point() else v
                for k, v in source.state_dict().items()}, path)
    rec = FaceRecognizer.from_file(path, arch="iresnet18")
    assert_close(rec.net.layer3[1].conv2.weight, source.layer3[1].conv2.weight.half().float(), atol=0, rtol=0)
    assert rec(torch.rand(1, 3, 112, 112)).shape == (1, 512)


def test_recognizer_from_file_names_the_file_on_mismatch(tmp_path):
    path = tmp_path / "not_arcface.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3), "head.weight": torch.zeros(2)}, path)
    with pytest.raises(FileFormatError, match=r"not_arcface\.pth.*iresnet50.*missing keys.*unexpected keys"):
        FaceRecognizer.from_file(path)
