"""feature_norm ("task": each task's features over its support's RMS norm; "unit": each of unit
length) against a per-task loop written out by hand, values and gradients, both orders; every
backend against the reference; evaluation, predict and the export see the same features."""
import copy

import pytest
import torch
import torch.nn.functional as F

from anil_fast import FewShotClassifier
from anil_fast.config import FEATURE_NORMS, scenario_config
from anil_fast.models.anil import QUERY_SCALE_INIT
from anil_fast.runs.settings import resolve
from helpers import assert_trains_alike, make, per_task_loop, random_batch


def by_hand(fs, fq, mode, first_order, query_scale=1.0):
    """The features the head should see, written without ANIL's code."""
    if mode == "unit":
        return fs / fs.norm(dim=-1, keepdim=True), fq / fq.norm(dim=-1, keepdim=True) * query_scale
    source = fs.detach() if first_order else fs
    rms = source.pow(2).sum(-1).mean().sqrt()
    return fs / rms, fq / rms * query_scale


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("mode", ["task", "unit"])
@pytest.mark.parametrize("head_init", ["learned", "proto"])
def test_the_meta_gradient_equals_a_loop_written_by_hand(mode, first_order, head_init):
    # float64, 5 ways of 3 shots (not powers of two), an inner lr that moves the head
    kw = dict(ways=5, seed=3, inner_lr=1.7, inner_steps=3, first_order=first_order,
              head_init=head_init, feature_norm=mode)
    anil = make(backend="fused", **kw)
    if head_init != "proto":  # the query logits' learned scale, away from its start
        assert anil.query_scale.item() == QUERY_SCALE_INIT
        with torch.no_grad():
            anil.query_scale.fill_(2.3)
    else:
        assert not hasattr(anil, "query_scale")  # the prototype head scales its own logits
    twin = copy.deepcopy(anil)
    batch = random_batch(tasks=3, ways=5, shots=3, queries=2, seed=11)
    anil.train()
    twin.train()
    loss = anil.meta_loss(batch)
    loss.backward()
    losses = []
    for t in range(batch.num_tasks):
        fs, fq = by_hand(twin.body(batch.support_x[t]), twin.body(batch.query_x[t]), mode,
                         first_order, getattr(twin, "query_scale", 1.0))
        w, b = twin.initial_head(fs[None], batch.support_y[t:t + 1])
        losses.append(per_task_loop(fs[None], batch.support_y[t:t + 1], fq[None],
                                    batch.query_y[t:t + 1], w, b, 1.7, 3, first_order)[0])
    expected = torch.cat(losses).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    grads = 0
    for (name, p), q in zip(anil.named_parameters(), twin.parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, msg=name)
        grads += 1
    assert grads >= 3  # the head and the body's layers did get gradients
    if head_init != "proto":
        assert anil.query_scale.grad.abs() > 0


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("mode", ["task", "unit"])
def test_every_backend_trains_as_the_reference(mode, first_order):
    kw = dict(ways=4, seed=5, inner_lr=1.3, inner_steps=2, first_order=first_order,
              feature_norm=mode)
    for other in ("fused", "per_task"):
        assert_trains_alike(make(backend="reference", **kw), make(backend=other, **kw))


def test_the_step_no_longer_depends_on_the_bodys_scale():
    # the body's features x 40: raw features move the logits 1,600 times as far per step;
    # normalised, a zero-initialised head adapts to the same logits
    batch = random_batch(tasks=2, ways=4, shots=2, queries=3, seed=2)
    results = {}
    for mode in ("none", "task", "unit"):
        for factor in (1.0, 40.0):
            anil = make(ways=4, seed=1, inner_lr=0.5, inner_steps=4, head_init="zero",
                        feature_norm=mode)
            with torch.no_grad():  # the last BatchNorm's affine: max-pool and ReLU follow it
                last = [m for m in anil.body.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
                last.weight.mul_(factor)
                last.bias.mul_(factor)
            anil.eval()
            results[mode, factor] = anil.adapted_logits(batch)[1]
    for mode in ("task", "unit"):
        torch.testing.assert_close(results[mode, 1.0], results[mode, 40.0], rtol=1e-4, atol=1e-6)
    assert (results["none", 1.0] - results["none", 40.0]).abs().max() > 1.0


@pytest.mark.parametrize("mode", ["task", "unit"])
def test_predict_and_the_export_see_the_same_features(mode, tmp_path):
    pytest.importorskip("onnx")
    from anil_fast.use.export import adapted_classifier
    anil = make(ways=4, seed=4, inner_lr=0.8, inner_steps=3, feature_norm=mode).float()
    batch = random_batch(tasks=1, ways=4, shots=2, queries=3, seed=9, dtype=torch.float32)
    clf = FewShotClassifier(anil, 16, 1, bn_mode="running")
    clf.fit(batch.support_x[0], batch.support_y[0].tolist())
    expected = clf.predict_proba(batch.query_x[0])
    module = adapted_classifier(clf, input_dtype="float")
    got = module(batch.query_x[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_setting_is_checked_and_carried_by_the_config():
    assert FEATURE_NORMS == ("none", "task", "unit")
    assert scenario_config("s2").feature_norm == "none"  # the default: ANIL as published
    config = resolve(scenario_config("std-20w1s", feature_norm="task", device="cpu")).config
    assert config.feature_norm == "task"
    with pytest.raises(ValueError, match="feature_norm"):
        resolve(scenario_config("s2", feature_norm="l2"))
    with pytest.raises(ValueError, match="feature_norm"):
        make(feature_norm="l2")


def test_zero_features_give_finite_losses():
    anil = make(ways=3, seed=0, feature_norm="task", inner_lr=1.0)
    fs = torch.zeros(2, 6, anil.head.in_features, dtype=torch.float64)
    hs, hq = anil.head_features(fs, fs)
    assert torch.isfinite(hs).all() and torch.isfinite(hq).all()
    assert torch.isfinite(F.normalize(fs, dim=-1)).all()


def test_the_query_scale_is_meta_trained():
    from anil_fast import MetaOptimizer
    anil = make(ways=4, seed=2, inner_lr=4.0, inner_steps=2, first_order=False,
                feature_norm="unit")
    optimizer = MetaOptimizer(anil, lr=0.01)
    assert "query_scale" in optimizer.optimizer.param_groups[0]["names"]
    optimizer.step(random_batch(seed=1))
    assert anil.query_scale.item() != QUERY_SCALE_INIT


@pytest.mark.parametrize("head_init", ["learned", "zero"])
def test_a_head_without_prototypes_gets_its_own_preset_settings(head_init):
    # the standard presets are built around the prototype head; another head gets unit
    # features, an inner step sized to the ways, and second order, each unless overridden
    for name, ways in (("std-20w1s", 20), ("std-5w5s", 5), ("lake-20w1s", 20)):
        config = scenario_config(name, head_init=head_init)
        assert (config.feature_norm, config.inner_lr, config.first_order) == ("unit", ways, False)
        assert any("feature_norm unit" in note for note in config.notes)
    config = scenario_config("std-20w1s", head_init=head_init, inner_lr=7.0, first_order=True)
    assert (config.feature_norm, config.inner_lr, config.first_order) == ("unit", 7.0, True)
    config = scenario_config("std-20w1s", head_init=head_init, feature_norm="none")
    assert (config.feature_norm, config.inner_lr) == ("none", 20.0)
    proto = scenario_config("std-20w1s")
    assert (proto.feature_norm, proto.inner_lr, proto.first_order, proto.notes) == \
        ("none", 0.1, True, [])
    # presets not built around the prototype head are left as they are
    s2 = scenario_config("s2", head_init=head_init)
    assert (s2.feature_norm, s2.inner_lr) == ("none", scenario_config("s2").inner_lr)


def test_the_large_inner_lr_warning_knows_normalised_features():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inner_lr = ways on unit features is the usual step
        make(ways=3, inner_lr=20.0, feature_norm="unit")
    with pytest.warns(UserWarning, match="inner_lr 20 is very large"):
        make(ways=3, inner_lr=20.0)  # on raw features it is not
    with pytest.warns(UserWarning, match="on normalised features"):
        make(ways=3, inner_lr=5000.0, feature_norm="task")
