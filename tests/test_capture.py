"""The CUDA-graph path's invariants, checked without a GPU.

A captured meta-step (capture.MetaStepRunner) replays the kernels it recorded on the tensors it
recorded: the optimizer must really be capturable (every group's flag, tensor learning rates
and state, step counts included, on the parameters' device), a resume or a loss-spike rollback
must copy into those tensors instead of replacing them, and nothing in the step may read a
value back to the host. The device checks run on CUDA fakes (FakeTensorMode): the same
dispatch as on a GPU, shapes and devices only, and any host read-back raises."""
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from anil_fast import ANIL, MetaOptimizer
from anil_fast import models
from anil_fast.errors import InputError
from helpers import make_trainable, random_batch


def trained_optimizer(steps=2, **kwargs):
    anil, opt = make_trainable(inner_lr=0.3, inner_steps=2, warmup_steps=1,
                               schedule=lambda step: 1 / (1 + step), **kwargs)
    for step in range(steps):
        opt.step(random_batch(seed=step))
    return anil, opt


def state_tensors(opt: MetaOptimizer) -> dict:
    return {(id(p), k): v for p, s in opt.optimizer.state.items() for k, v in s.items()
            if isinstance(v, torch.Tensor)}


def test_make_capturable_sets_every_flag_keeps_the_state_and_its_lrs_are_tensors():
    anil, opt = trained_optimizer()
    before = {k: v.clone() for k, v in state_tensors(opt).items()}
    opt.make_capturable()
    assert opt.capturable
    assert {g["capturable"] for g in opt.optimizer.param_groups} == {True}
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.optimizer.param_groups)
    for group in opt.optimizer.param_groups:  # the coming step's (the third): 1 / (1 + 2)
        assert float(group["lr"]) == pytest.approx(group["base_lr"] / 3)
    after = state_tensors(opt)
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key].float(), value.float())
    # the names, warmup flags and base lrs of the groups survive the rebuild
    assert [g["name"] for g in opt.optimizer.param_groups][0] == "head"
    assert all("base_lr" in g and "warmup" in g for g in opt.optimizer.param_groups)


def cuda_fake_model(**kwargs):
    """An ANIL model made on CUDA fakes (float32, fused backend; batched body, as on a GPU).
    Call inside FakeTensorMode."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        body, head = models.build("conv4", 4, 16)
    return ANIL(body, head, inner_lr=0.3, inner_steps=2, backend="fused", **kwargs)


def fake_gradients(anil):
    for p in anil.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)


def test_on_cuda_the_capturable_state_lrs_and_step_counts_live_on_the_device():
    with FakeTensorMode(allow_non_fake_inputs=True):
        anil = cuda_fake_model()
        opt = MetaOptimizer(anil, warmup_steps=1, schedule=lambda step: 1 / (1 + step))
        fake_gradients(anil)
        opt.apply_gradients("cuda")  # an eager step first: its step counts are on the host
        opt.end_step()
        assert "cpu" in {v.device.type for v in state_tensors(opt).values()}
        opt.make_capturable()
        assert {g["capturable"] for g in opt.optimizer.param_groups} == {True}
        assert {g["lr"].device.type for g in opt.optimizer.param_groups} == {"cuda"}
        assert {v.device.type for v in state_tensors(opt).values()} == {"cuda"}


@pytest.mark.parametrize("kwargs", [
    {}, {"first_order": False}, {"head_init": "proto"}, {"joint_batchnorm": True},
    {"freeze_body": True}])
def test_the_captured_step_reads_nothing_back_to_the_host(kwargs):
    # what MetaStepRunner records: begin_step on the host, then device_step: the meta-loss
    # (body, fused head) and the update (norm, clipping, capturable Adam). The first batch's
    # label check (a host read) runs in the runner's warm-up iterations, before capture.
    # Autograd's engine needs a real CUDA context, so the backward is stood in for by fake
    # gradients; the forward and the update are the ones a GPU runs.
    with FakeTensorMode(allow_non_fake_inputs=True):
        anil = cuda_fake_model(**kwargs)
        opt = MetaOptimizer(anil, warmup_steps=1, schedule=lambda step: 1 / (1 + step),
                            clip_grad_norm=1.0)
        opt.make_capturable()
        batch = random_batch(seed=0, dtype=torch.float32).to("cuda")
        anil._labels_checked = True  # the warm-up's check, done
        assert anil.uses_batched_body(batch.support_x.device)
        for _ in range(2):
            opt.begin_step()
            loss = anil.meta_loss(batch)
            fake_gradients(anil)
            norm = opt.apply_gradients("cuda")
            opt.end_step()
        assert loss.device.type == norm.device.type == "cuda"
        with pytest.raises(DataDependentOutputException):
            float(loss)  # the check itself: a host read-back does raise here


def test_resume_and_rollback_into_a_capturable_optimizer_copy_into_the_tensors_it_holds():
    anil, opt = trained_optimizer(steps=1)
    _, other = trained_optimizer(steps=3)
    opt.make_capturable()
    held = state_tensors(opt)
    held_lrs = [g["lr"] for g in opt.optimizer.param_groups]
    saved = other.state_dict()
    saved["lr_scale"] = 0.5  # as a rollback leaves it
    opt.load_state_dict(saved)
    now = state_tensors(opt)
    assert now.keys() == held.keys()
    assert all(now[k] is held[k] for k in held)  # the same objects a graph recorded
    assert [g["lr"] for g in opt.optimizer.param_groups] == held_lrs
    assert {g["capturable"] for g in opt.optimizer.param_groups} == {True}
    for (p, state), (q, expected) in zip(opt.optimizer.state.items(), other.optimizer.state.items()):
        for key, value in expected.items():
            torch.testing.assert_close(state[key].float(), value.float(), msg=key)
    assert opt.steps == 3 and opt.lr_scale == 0.5
    factor = 1 / (1 + 3) * 0.5
    for group in opt.optimizer.param_groups:  # filled in place: the graph reads them
        assert float(group["lr"]) == pytest.approx(group["base_lr"] * factor)


def minimal_checkpoint() -> dict:
    from anil_fast.runs.build import rng_state
    from anil_fast.runs.folder import CHECKPOINT_FORMAT
    from anil_fast.config import Config
    return {"format": CHECKPOINT_FORMAT, "config": Config().to_dict(), "rng": rng_state(),
            "sampler": {"generator": torch.Generator().get_state(), "position": 0, "order": None},
            "elapsed_s": 1.0}


def test_loss_spike_rollback_under_capture_keeps_the_graphs_tensors(tmp_path):
    from anil_fast.training.rollback import roll_back
    from anil_fast.runs.folder import RunFolder
    anil, opt = trained_optimizer(steps=2)
    folder = RunFolder(tmp_path / "run")
    folder.create()
    folder.save_checkpoint({**minimal_checkpoint(), "model": anil.state_dict(),
                            "optimizer": opt.state_dict(), "step": 2})
    expected = {k: v.clone() for k, v in state_tensors(opt).items()}
    weights = {n: p.detach().clone() for n, p in anil.named_parameters()}
    opt.step(random_batch(seed=5))  # moves on past the checkpoint
    opt.make_capturable()
    held, params = state_tensors(opt), list(anil.parameters())
    record = roll_back(anil, opt, folder.path)
    assert record["outer_lr_scale"] == 0.5
    assert all(state_tensors(opt)[k] is held[k] for k in held)
    assert all(p is q for p, q in zip(anil.parameters(), params))
    for key, value in expected.items():
        torch.testing.assert_close(held[key].float(), value.float())
    for name, p in anil.named_parameters():
        torch.testing.assert_close(p.detach(), weights[name], msg=name)


@pytest.mark.parametrize("change", ["groups", "shape", "steps", "scale"])
def test_an_optimizer_state_that_does_not_fit_is_refused_before_anything_changes(change):
    anil, opt = trained_optimizer(steps=1)
    _, other = trained_optimizer(steps=2)
    saved = other.state_dict()
    if change == "groups":
        saved["optimizer"]["param_groups"] = saved["optimizer"]["param_groups"][:1]
    elif change == "shape":
        first = next(iter(saved["optimizer"]["state"].values()))
        first["exp_avg"] = torch.zeros(7, 3)
    elif change == "steps":
        saved["steps"] = "12"
    else:
        saved["lr_scale"] = float("nan")
    held = {k: v.clone() for k, v in state_tensors(opt).items()}
    with pytest.raises(InputError, match="optimizer state"):
        opt.load_state_dict(saved)
    for key, value in state_tensors(opt).items():
        torch.testing.assert_close(value, held[key])
    assert opt.steps == 1
