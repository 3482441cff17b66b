import copy

import pytest
import torch

from anil_fast import ANIL, MetaOptimizer
from anil_fast import models
from anil_fast.models.batchnorm import batchnorm_layers
from anil_fast.training.capture import MetaStepRunner
from anil_fast.config import scenario_config, validate_config
from helpers import assert_trains_alike, make, make_trainable, per_task_loop, random_batch


@pytest.mark.parametrize("first_order", [True, False])
def test_meta_loss_equals_explicit_per_task_loop(first_order):
    anil = make(inner_lr=0.3, inner_steps=3, first_order=first_order, backend="reference")
    twin = copy.deepcopy(anil)
    batch = random_batch()
    anil.train()
    loss = anil.meta_loss(batch)
    loss.backward()
    # the loop the ANIL write-ups show: per task, body on support then query, then the head
    losses = []
    for t in range(batch.num_tasks):
        fs = twin.body(batch.support_x[t]).unsqueeze(0)
        fq = twin.body(batch.query_x[t]).unsqueeze(0)
        losses.append(per_task_loop(fs, batch.support_y[t:t + 1], fq, batch.query_y[t:t + 1],
                                    twin.head.weight, twin.head.bias, 0.3, 3, first_order)[0])
    expected = torch.cat(losses).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for (name, p), q in zip(anil.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


SCENARIOS = {
    "s1-second-order": dict(first_order=False),
    "s2-first-order": dict(first_order=True),
    "s4-frozen-body": dict(freeze_body=True),
    "s5-multipliers": dict(multipliers={"0.": 0.0, "1.": 0.5, "2.": 0.1, "default": 1.0},
                           warmup_steps=1),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_batched_body_equals_per_task_loop(scenario):
    kwargs = dict(inner_lr=0.2, inner_steps=2, backend="reference", **SCENARIOS[scenario])
    loop, loop_opt = make_trainable(batched_body=False, **kwargs)
    batched, batched_opt = make_trainable(batched_body=True, **kwargs)
    for step in range(2):
        batch = random_batch(seed=step, tasks=3)
        out_loop = loop_opt.step(batch)
        out_batched = batched_opt.step(batch)
        torch.testing.assert_close(out_batched["loss"], out_loop["loss"])
    for (name, p), q in zip(loop.named_parameters(), batched.parameters()):
        torch.testing.assert_close(q, p, msg=name)
    for (name, buf), other in zip(loop.named_buffers(), batched.buffers()):
        torch.testing.assert_close(other, buf, msg=name)  # running statistics too
    batch = random_batch(seed=7)
    for mode in ("transductive", "running"):
        a, b = loop.evaluate(batch, bn_mode=mode), batched.evaluate(batch, bn_mode=mode)
        torch.testing.assert_close(a["per_task_after"], b["per_task_after"])


def test_batched_body_resnet18_equals_loop():
    kwargs = dict(inner_lr=0.1, inner_steps=1, backend="reference", freeze_body=True)
    loop, loop_opt = make_trainable("resnet18", size=16, batched_body=False, **kwargs)
    batched, batched_opt = make_trainable("resnet18", size=16, batched_body=True, **kwargs)
    batch = random_batch(tasks=2, shots=1, queries=2)
    torch.testing.assert_close(batched_opt.step(batch)["loss"], loop_opt.step(batch)["loss"])
    for (name, buf), other in zip(loop.named_buffers(), batched.buffers()):
        torch.testing.assert_close(other, buf, msg=name)


def test_frozen_body_trains_batchnorm_only():
    anil, opt = make_trainable(freeze_body=True, inner_lr=0.3, lr=0.05, backend="reference")
    before = {n: p.detach().clone() for n, p in anil.body.named_parameters()}
    stats = [bn.running_mean.clone() for bn in batchnorm_layers(anil.body)]
    opt.step(random_batch())
    assert not anil.body[0][0].training and anil.body[0][1].training  # conv eval, BN train
    for name, p in anil.body.named_parameters():
        is_bn = name.split(".")[1] == "1"
        moved = not torch.equal(p, before[name])
        assert moved == is_bn, name
        assert p.requires_grad == is_bn
    assert all(not torch.equal(bn.running_mean, s) for bn, s in zip(batchnorm_layers(anil.body), stats))
    report = opt.groups_report()
    assert report[1]["batchnorm"] and len(report) == 2


def test_multipliers_and_warmup():
    mult = {"0.0": 0.0, "0.1": 0.5, "1.0": 0.25, "default": 2.0, "1.0.bias": 0.0}
    anil, opt = make_trainable(multipliers=mult, warmup_steps=2, lr=0.01, backend="reference")
    groups = {g["name"]: g for g in opt.optimizer.param_groups}
    assert set(groups) == {"head", "body-bnx0.5", "bodyx0.25", "bodyx2", "body-bnx2"}
    names = {r["name"]: r["names"] for r in opt.groups_report()}
    assert names["bodyx0.25"] == ["body.1.0.weight"]  # longest prefix wins over "1.0" for the bias
    assert not anil.body[0][0].weight.requires_grad  # multiplier 0: never trained
    history = []
    snapshots = []
    for step in range(4):
        snapshots.append(anil.body[1][0].weight.detach().clone())
        opt.step(random_batch(seed=step))
        history.append(opt.learning_rates())  # the rates the step just used
    # during warmup: conv groups at 0, BatchNorm and head at their rates
    for lrs in history[:2]:
        assert lrs["bodyx0.25"] == 0 and lrs["bodyx2"] == 0
        assert lrs["head"] == 0.01 and lrs["body-bnx0.5"] == 0.005 and lrs["body-bnx2"] == 0.02
    for lrs in history[2:]:
        assert lrs["bodyx0.25"] == 0.0025 and lrs["bodyx2"] == 0.02
    assert torch.equal(snapshots[0], snapshots[2])  # held during the warmup steps
    assert not torch.equal(snapshots[2], snapshots[3])  # moves afterwards
    with pytest.raises(ValueError, match="multipliers"):
        make_trainable(multipliers={"9.": 1.0})


def test_evaluate_leaves_running_statistics_alone():
    anil = make(backend="reference")
    buffers = [b.clone() for b in anil.buffers()]
    result = anil.evaluate(random_batch(), bn_mode="transductive")
    assert set(result) >= {"accuracy_before", "accuracy_after", "per_task_after"}
    assert result["per_task_after"].shape == (3,)
    assert all(torch.equal(a, b) for a, b in zip(buffers, anil.buffers()))
    with pytest.raises(ValueError, match="bn_mode"):
        anil.evaluate(random_batch(), bn_mode="magic")


def test_bf16_autocast_trains_on_cpu(synthetic_characters):
    from anil_fast.data import TaskSampler
    torch.manual_seed(0)
    body, head = models.build("conv4", 5, 28)
    anil = ANIL(body, head, inner_lr=0.4, precision="bf16", backend="reference")
    opt = MetaOptimizer(anil, lr=0.001)
    sampler = TaskSampler(synthetic_characters, 5, 1, 5, 4, rotations=False, seed=0)
    losses = [opt.step(sampler.sample())["loss"].item() for _ in range(15)]  # learnable: fast
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.parametrize("kwargs, word", [
    (dict(inner_steps=-1), "inner_steps"), (dict(inner_lr=float("nan")), "inner_lr"),
    (dict(backend="x"), "backend"), (dict(precision="fp8"), "precision"),
    (dict(warmup_steps=-2), "warmup_steps"), (dict(schedule=3), "schedule"),
    (dict(optimizer="adam"), "optimizer")])
def test_bad_anil_arguments(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        make_trainable(**kwargs)


def test_compile_changes_no_result():
    eager = make(inner_lr=0.3, inner_steps=2, batched_body=True)
    compiled = make(inner_lr=0.3, inner_steps=2, batched_body=True, compile="aot_eager")
    assert_trains_alike(eager, compiled, steps=3)
    assert list(compiled.state_dict()) == list(eager.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_changes_no_result():
    eager = make(inner_lr=0.3, inner_steps=2, batched_body=True, backend="fused").float().cuda()
    graphed = make(inner_lr=0.3, inner_steps=2, batched_body=True, backend="fused").float().cuda()
    eager_opt = MetaOptimizer(eager, warmup_steps=1, schedule=lambda step: 1 / (1 + step))
    runner = MetaStepRunner(MetaOptimizer(graphed, warmup_steps=1, schedule=lambda step: 1 / (1 + step)),
                            capture=True)
    for step in range(4):
        batch = random_batch(seed=step, dtype=torch.float32).to("cuda")
        a = eager_opt.step(batch)["loss"]
        b = runner(batch)["loss"]
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert runner.graph is not None


def test_sgd_with_a_cosine_schedule_and_warmup_each_update_checked_by_hand():
    # any torch.optim optimizer and any schedule: MetaOptimizer.step (begin_step, device_step,
    # end_step, as MetaStepRunner replays them on CUDA). Each update is checked by hand.
    import math
    anil, opt = make_trainable(inner_lr=0.3, inner_steps=2, optimizer=torch.optim.SGD, lr=0.05,
                               schedule=lambda step: 0.5 * (1 + math.cos(math.pi * step / 4)),
                               warmup_steps=1)
    from anil_fast.models.batchnorm import batchnorm_parameter_names
    bn = {f"body.{n}" for n in batchnorm_parameter_names(anil.body)}
    twin = copy.deepcopy(anil)
    step = opt.step
    assert isinstance(opt.optimizer, torch.optim.SGD)
    for k in range(3):
        batch = random_batch(seed=k)
        twin.train()
        twin.zero_grad()
        twin.meta_backward(batch)
        lr = 0.05 * 0.5 * (1 + math.cos(math.pi * k / 4))
        expected = {}
        for name, p in twin.named_parameters():
            held = k < 1 and name.startswith("body.") and name not in bn  # warmup: not BN
            expected[name] = p.detach() - (0 if held or p.grad is None else lr * p.grad)
        step(batch)
        for name, p in anil.named_parameters():
            torch.testing.assert_close(p, expected[name], msg=f"step {k}: {name}")
        with torch.no_grad():
            for p, q in zip(twin.parameters(), anil.parameters()):
                p.copy_(q)
    assert opt.steps == 3


def test_a_callers_optimizer_keeps_its_groups():
    anil = make(inner_lr=0.3, inner_steps=1)
    sgd = torch.optim.SGD([{"params": anil.head.parameters(), "lr": 0.1},
                           {"params": anil.body.parameters(), "lr": 0.01}])
    opt = MetaOptimizer(anil, optimizer=sgd, warmup_steps=1)
    assert [g["warmup"] for g in sgd.param_groups] == [False, False]  # the body's holds BN too
    opt.step(random_batch())
    assert opt.learning_rates() == {"group0": 0.1, "group1": 0.01}
    with pytest.raises(ValueError, match="multipliers"):
        MetaOptimizer(anil, optimizer=sgd, multipliers={"default": 1.0})


def test_checkpoint_of_another_model_is_a_value_error(tmp_path):
    from anil_fast.runs.build import load_model_state
    conv4 = make()
    other = make(ways=5)
    with pytest.raises(ValueError, match="checkpoint"):
        load_model_state(conv4, other.state_dict())


# -- bad input and side effects ------------------------------------------------------------------

def test_anil_leaves_the_bodys_memory_format_alone():
    anil, opt = make_trainable(inner_lr=0.2, inner_steps=1)  # fast path on the CPU
    opt.step(random_batch())
    conv = next(p for p in anil.body.parameters() if p.dim() == 4)
    assert conv.is_contiguous()  # not converted behind the caller's back
    asked = make(inner_lr=0.2, inner_steps=1, channels_last=True)  # converted when asked
    conv = next(p for p in asked.body.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    twin = make(inner_lr=0.2, inner_steps=1, channels_last=True)
    plain = make(inner_lr=0.2, inner_steps=1)
    batch = random_batch(seed=4)
    torch.testing.assert_close(MetaOptimizer(twin).step(batch)["loss"],
                               MetaOptimizer(plain).step(batch)["loss"])


def test_tf32_flags_are_restored():
    anil, opt = make_trainable(precision="tf32")
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with anil.precision_context(torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    opt.step(random_batch())
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


@pytest.mark.parametrize("kwargs, word", [(dict(inner_lr=-0.1), "inner_lr"),
                                          (dict(lr=-1e-3), "outer_lr"),
                                          (dict(lr=1e38), "outer_lr")])
def test_learning_rates_that_make_no_sense_are_refused(kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_trainable(**kwargs)


@pytest.mark.parametrize("kwargs, word", [(dict(inner_lr=50.0), "inner_lr"),
                                          (dict(lr=5.0), "outer_lr")])
def test_odd_learning_rates_warn(kwargs, word):
    with pytest.warns(UserWarning, match=word):
        make_trainable(**kwargs)


def test_a_batch_that_is_not_a_task_batch_is_named():
    anil, opt = make_trainable()
    batch = random_batch()
    as_tuple = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    for call in (opt.step, anil.meta_loss, anil.meta_backward, anil.evaluate):
        with pytest.raises(TypeError, match="TaskBatch"):
            call(as_tuple)


# -- capture preparation and grouped BatchNorm leave the caller's objects usable ------------------

def test_capture_of_an_optimizer_without_a_capturable_mode():
    # SGD has no `capturable` argument: with a constant learning rate it is captured as it is
    # (and steps exactly as before); with a schedule or warmup a graph would replay its first
    # learning rate, so preparing it says so, naming the optimizer
    anil, opt = make_trainable(inner_lr=0.3, inner_steps=2, optimizer=torch.optim.SGD, lr=0.05,
                               momentum=0.9)
    twin, twin_opt = make_trainable(inner_lr=0.3, inner_steps=2, optimizer=torch.optim.SGD,
                                    lr=0.05, momentum=0.9)
    opt.step(random_batch(seed=0))
    twin_opt.step(random_batch(seed=0))
    opt.make_capturable()
    assert isinstance(opt.optimizer, torch.optim.SGD)
    for k in range(1, 3):
        opt.device_step(random_batch(seed=k))  # the function a graph captures, eagerly
        opt.end_step()
        twin_opt.step(random_batch(seed=k))
    for (name, p), q in zip(anil.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    for kwargs in (dict(schedule=lambda step: 0.5), dict(warmup_steps=2)):
        _, scheduled = make_trainable(optimizer=torch.optim.Adagrad, lr=0.05, **kwargs)
        with pytest.raises(ValueError, match="Adagrad has no capturable mode"):
            scheduled.make_capturable()


def test_grouped_batchnorm_leaves_no_class_swap_behind(tmp_path):
    import io
    anil = make(inner_lr=0.3, inner_steps=1, batched_body=True, backend="fused")
    classes = [type(bn) for bn in batchnorm_layers(anil.body)]
    opt = MetaOptimizer(anil)
    opt.step(random_batch())
    anil.evaluate(random_batch(seed=1))
    assert [type(bn) for bn in batchnorm_layers(anil.body)] == classes
    assert all(not hasattr(bn, "_anil_sink") or bn._anil_sink is None
               for bn in batchnorm_layers(anil.body))
    buffer = io.BytesIO()
    torch.save(anil.body, buffer)  # a whole module pickles (a class made at run time would not)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = random_batch().support_x[0]
    anil.body.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), anil.body(x))


# -- the API checks shapes and labels on first use --------------------------------------------------

def test_a_head_that_does_not_fit_the_tasks_is_named_before_anything_moves():
    from anil_fast.data import TaskBatch
    batch = random_batch(tasks=2, ways=5, shots=3, queries=4, seed=7)
    batch.support_y[:, :5] = torch.arange(5)  # every way present
    torch.manual_seed(0)
    body, head = models.build("conv4", 5, 16, channels=1)
    body = body.double()
    narrow = torch.nn.Linear(head.in_features, 3).double()  # fewer outputs than ways
    wide = torch.nn.Linear(head.in_features, 7).double()  # more outputs than ways
    for bad, message in ((narrow, r"labels must lie in 0\.\.2"), (wide, "5 ways .* 7 outputs")):
        anil = ANIL(copy.deepcopy(body), bad)
        with pytest.raises(ValueError, match=message):
            anil.evaluate(batch)
        opt = MetaOptimizer(anil)
        before = [p.detach().clone() for p in anil.parameters()]
        with pytest.raises(ValueError, match=message):
            opt.step(batch)
        assert all(torch.equal(a, b) for a, b in zip(before, anil.parameters()))  # nothing moved
    with pytest.raises(ValueError, match="bias"):
        ANIL(body, torch.nn.Linear(head.in_features, 5, bias=False))
    with pytest.raises(ValueError, match="features per image"):
        ANIL(body, torch.nn.Linear(head.in_features + 3, 5).double()).evaluate(batch)
    # labels out of range on a head of the right size
    anil = ANIL(body, head.double())
    bad = TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y.clone())
    bad.query_y[0, 0] = 9
    with pytest.raises(ValueError, match=r"0\.\.4.*found 0\.\.9"):
        anil.evaluate(bad)
    bad.query_y[0, 0] = -1
    with pytest.raises(ValueError, match="found -1"):
        MetaOptimizer(anil).step(bad)


def test_an_optimizer_over_other_parameters_is_refused():
    anil = make()
    other = make(seed=1)
    with pytest.raises(ValueError, match="none of the model's parameters"):
        MetaOptimizer(anil, optimizer=torch.optim.Adam(other.parameters()))
    MetaOptimizer(anil, optimizer=torch.optim.SGD(anil.head.parameters(), lr=0.1))  # fine


@pytest.mark.parametrize("clip", [None, 0.37, 1e6])
def test_the_meta_gradient_norm_is_reported_and_clipped(clip):
    """step() reports the meta-gradient's norm; with clip_grad_norm the update is the one of
    the gradient scaled down to that norm (SGD at lr 1: the step is minus the gradient)."""
    anil = make(inner_lr=0.3, inner_steps=2)
    batch = random_batch(seed=7)
    probe = make(inner_lr=0.3, inner_steps=2)
    sums, total = probe.meta_backward(batch)
    grads = [p.grad for p in probe.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    opt = MetaOptimizer(anil, lr=1.0, optimizer=torch.optim.SGD, clip_grad_norm=clip)
    before = [p.detach().clone() for p in anil.parameters()]
    out = opt.step(batch)
    torch.testing.assert_close(out["grad_norm"], norm)
    scale = 1.0 if clip is None else min(1.0, clip / (norm.item() + 1e-6))
    assert (scale < 1) == (clip == 0.37)
    for p, p0, g in zip(anil.parameters(), before, grads):
        torch.testing.assert_close(p0 - p.detach(), scale * g)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_bad_clip_grad_norm_is_refused(bad):
    with pytest.raises(ValueError, match="clip_grad_norm"):
        MetaOptimizer(make(), clip_grad_norm=bad)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        validate_config(scenario_config("std-5w1s", clip_grad_norm=bad))


# -- BatchNorm "support": queries normalised with their task's support statistics ------------------

def test_support_mode_normalises_queries_with_the_support_statistics():
    anil = make(ways=4, seed=3)
    batch = random_batch(tasks=2, ways=4, shots=2, queries=3, seed=5)
    for bn in batchnorm_layers(anil.body):  # running statistics unlike any batch's
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
    saved = copy.deepcopy(anil.body.state_dict())
    anil.eval()
    with torch.no_grad():
        fs, fq = anil.features(batch, "support")
        ts, tq = anil.features(batch, "transductive")
        # the support set through both: its own statistics, as transductive gives them
        torch.testing.assert_close(fs, ts)
        # queries equal to the support images get exactly the support features
        same = type(batch)(batch.support_x, batch.support_y, batch.support_x, batch.support_y)
        s2, q2 = anil.features(same, "support")
        torch.testing.assert_close(q2, s2)
        # a query's features do not depend on the other queries (transductive's do)
        alone = type(batch)(batch.support_x, batch.support_y, batch.query_x[:, :1], batch.query_y[:, :1])
        _, fq1 = anil.features(alone, "support")
        torch.testing.assert_close(fq1[:, 0], fq[:, 0])
        _, tq1 = anil.features(alone, "transductive")
        assert not torch.allclose(tq1[:, 0], tq[:, 0])
        # and differ from both other modes
        _, rq = anil.features(batch, "running")
        assert not torch.allclose(fq, tq) and not torch.allclose(fq, rq)
    # running statistics and modes are left as they were
    for (name, a), b in zip(saved.items(), anil.body.state_dict().values()):
        assert torch.equal(a, b), name
    assert not anil.training
    result = anil.evaluate(batch, bn_mode="support")
    assert 0 <= result["accuracy_after"] <= 1


# -- BatchNorm "joint": support and query through the body in one call per task -------------------

def test_joint_mode_is_one_call_per_task_batched_or_not():
    batch = random_batch(tasks=3, ways=4, shots=2, queries=3, seed=11)
    loop = make(ways=4, seed=2, joint_batchnorm=True, batched_body=False, inner_lr=0.2,
                inner_steps=2, first_order=False)
    batched = make(ways=4, seed=2, joint_batchnorm=True, batched_body=True, inner_lr=0.2,
                   inner_steps=2, first_order=False)
    # the plain per-task call learn2learn makes, on a copy: features and running statistics
    plain = copy.deepcopy(loop.body).train()
    expected = [plain(torch.cat([batch.support_x[t], batch.query_x[t]])) for t in range(3)]
    for model in (loop, batched):
        model.train()
        fs, fq = model.features(batch, "train")
        for t in range(3):
            torch.testing.assert_close(torch.cat([fs[t], fq[t]]), expected[t])
        for (n, b), c in zip(plain.named_buffers(), model.body.buffers()):
            torch.testing.assert_close(c, b, msg=n)  # updated once per task, in task order
    # evaluation: the same statistics, running statistics untouched; differs from per-set
    before = copy.deepcopy(batched.body.state_dict())
    with torch.no_grad():
        js, jq = batched.features(batch, "joint")
        ts, tq = batched.features(batch, "transductive")
    ref = copy.deepcopy(batched.body).train()
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([js[0], jq[0]]), ref(torch.cat([batch.support_x[0], batch.query_x[0]])))
    assert not torch.allclose(jq, tq)
    for (n, a), b in zip(before.items(), batched.body.state_dict().values()):
        assert torch.equal(a, b), n
    # a meta-step: batched and per-task joint alike (float64, second order)
    fresh = lambda batched_body: make(ways=4, seed=2, joint_batchnorm=True,  # noqa: E731
                                      batched_body=batched_body, inner_lr=0.2, inner_steps=2,
                                      first_order=False)
    assert_trains_alike(fresh(False), fresh(True))
    assert 0 <= batched.evaluate(batch, bn_mode="joint")["accuracy_after"] <= 1


# -- each task's initial head: learned, zero, proto (prototypes of its support set) ---------------

def test_proto_head_starts_as_the_nearest_prototype_classifier():
    anil = make(ways=4, seed=4, head_init="proto")
    batch = random_batch(tasks=2, ways=4, shots=3, queries=5, seed=8)
    batch.support_y[:, :4] = torch.arange(4)  # every class has a prototype
    with torch.no_grad():
        fs, fq = anil.features(batch, "transductive")
        w, b = anil.initial_head(fs, batch.support_y)
    for t in range(2):
        protos = torch.stack([fs[t][batch.support_y[t] == c].mean(0) for c in range(4)])
        torch.testing.assert_close(w[t], 2 * protos)
        torch.testing.assert_close(b[t], -(protos ** 2).sum(-1))
        nearest = torch.cdist(fq[t], protos).argmin(-1)  # ProtoNet's prediction
        logits = fq[t] @ w[t].T + b[t]
        assert torch.equal(logits.argmax(-1), nearest)
    result = anil.evaluate(batch, inner_steps=0)
    manual = [(torch.cdist(fq[t], torch.stack([fs[t][batch.support_y[t] == c].mean(0)
               for c in range(4)])).argmin(-1) == batch.query_y[t]).double().mean() for t in range(2)]
    assert result["accuracy_after"] == pytest.approx(float(sum(manual) / 2))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("head_init", ["proto", "zero"])
def test_fused_head_with_per_task_initial_heads_equals_the_reference(head_init, first_order):
    # float64, values and gradients through the prototypes into the body and the scale
    kw = dict(ways=4, seed=6, head_init=head_init, first_order=first_order, inner_lr=0.3,
              inner_steps=3)
    for other in ("fused", "per_task"):
        assert_trains_alike(make(backend="reference", **kw), make(backend=other, **kw))


def test_the_prototype_scale_and_the_body_learn_in_first_order():
    anil, opt = make_trainable(ways=4, seed=6, head_init="proto", first_order=True,
                               inner_lr=0.3, inner_steps=2, lr=0.01)
    assert "proto_scale" in opt.groups_report()[0]["names"]
    assert "proto_scale" in anil.state_dict()
    before = anil.proto_scale.item(), [p.detach().clone() for p in anil.body.parameters()]
    opt.step(random_batch(seed=3))
    assert anil.proto_scale.item() != before[0]
    # first order: the support features reach the loss through the prototypes
    assert any(not torch.equal(a, b) for a, b in zip(before[1], anil.body.parameters()))
    with pytest.raises(ValueError, match="head_init"):
        make(head_init="prototypes")


@pytest.mark.parametrize("joint", [False, True])
def test_bf16_batched_body_on_cpu_matches_the_per_task_body(joint):
    """bf16 autocast with the batched body on the CPU (its per-task BatchNorm statistics kept
    in fp32, as the layers' own): the per-task body's loss, gradients and running statistics,
    to bf16's precision."""
    models_ = [make(size=19, ways=3, hidden=9, inner_lr=0.3, inner_steps=2, precision="bf16",
                    batched_body=batched, joint_batchnorm=joint).float() for batched in (False, True)]
    batch = random_batch(tasks=3, ways=3, shots=2, queries=4, size=19, seed=5, dtype=torch.float32)
    grads = []
    for anil in models_:
        loss = anil.train().meta_loss(batch)
        grads.append([loss.detach()] + list(torch.autograd.grad(loss, list(anil.parameters()))))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.02)
    for a, b in zip(models_[0].buffers(), models_[1].buffers()):
        torch.testing.assert_close(b.float(), a.float(), rtol=0.02, atol=0.02)
