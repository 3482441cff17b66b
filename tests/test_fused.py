"""The fused op `anil_fast::adapted_head` against the reference backend, with each of its
small-loop kernels on CPU tensors (C++, Triton under the interpreter, batched torch): values and
all four gradients, first and second order."""
import os

import pytest
import torch

from anil_fast.models import ops
from anil_fast.models.functional import adapted_query_loss
from helpers import assert_trains_alike, grads_of, head_problem, make, per_task_loop

cpp_missing = ops.cpp_extension() is None


def test_cpp_small_loop_builds():
    # The C++ tests below skip without the build, so its absence must fail somewhere: here,
    # unless a machine without a compiler says so (ANIL_FAST_ALLOW_NO_CPP=1).
    if os.environ.get("ANIL_FAST_ALLOW_NO_CPP") != "1":
        assert not cpp_missing, f"the C++ small loop did not build: {ops._cpp_error}"


needs_cpp = pytest.mark.skipif(cpp_missing, reason="C++ small loop could not be built here")
needs_triton = pytest.mark.skipif(not ops.triton_interpreter(),
                                  reason="triton (interpreter) not available")


@pytest.fixture
def cpu_loop(monkeypatch):
    """Pick the op's small-loop kernel for CPU tensors: "cpp", "triton" or "torch"."""
    def use(name):
        monkeypatch.setattr(ops, "CPU_LOOP", name)
        assert ops.small_loop(torch.device("cpu")).name == name
    return use


# (tasks, support rows, query rows, feature dim, ways, inner steps): random, odd sizes and the
# edges the op promises (0 steps, D = 1, one task, 64 ways, D = 1,025 / 2,304, 100 steps,
# 20-way 5-shot).
SHAPES = [
    (3, 5, 7, 9, 4, 3), (1, 10, 3, 1, 5, 0), (2, 70, 13, 33, 64, 2), (2, 6, 5, 1025, 5, 5),
    (1, 5, 25, 2304, 5, 5), (2, 8, 6, 12, 4, 100), (3, 100, 100, 64, 20, 5), (5, 3, 4, 7, 2, 1),
]


def per_task_initial_head(w, b, tasks, seed):
    """A different initial head for every task ([T, N, D], [T, N]), as prototypes give."""
    g = torch.Generator().manual_seed(seed)
    return (w + 0.3 * torch.randn(tasks, *w.shape, generator=g, dtype=w.dtype),
            b + 0.1 * torch.randn(tasks, *b.shape, generator=g, dtype=b.dtype))


def compare(shape, first_order, dtype, lr=0.37, atol=None, rtol=None, feature_dtype=None,
            per_task=False):
    """The fused op (with the small loop the test picked) against the reference; per_task:
    each task with its own initial head."""
    tasks, s_rows, q_rows, dim, ways, steps = shape
    if steps == 100:
        lr = 0.05
    fs, ys, fq, yq, w, b = head_problem(tasks, s_rows, q_rows, dim, ways, dtype=torch.float64,
                                        seed=sum(shape), scale=0.5)
    if per_task:
        w, b = per_task_initial_head(w, b, tasks, sum(shape))
    ref = grads_of(lambda f, q, ww, bb: adapted_query_loss(
        f, ys, q, yq, ww, bb, inner_lr=lr, inner_steps=steps, first_order=first_order,
        backend="reference"), [fs, fq, w, b])
    fdt = feature_dtype or dtype
    got = grads_of(lambda f, q, ww, bb: adapted_query_loss(
        f, ys, q, yq, ww, bb, inner_lr=lr, inner_steps=steps, first_order=first_order,
        backend="fused"), [fs.to(fdt), fq.to(fdt), w.to(dtype), b.to(dtype)])
    tol = dict(atol=atol, rtol=rtol) if atol is not None else {}
    names = ["losses", "logits"]
    for name, a, r in zip(names, got[:2], ref[:2]):
        torch.testing.assert_close(a.double(), r, msg=name, **tol)
    for name, a, r in zip(["support_features", "query_features", "weight", "bias"], got[2], ref[2]):
        torch.testing.assert_close(a.double(), r, msg=f"grad {name}", **tol)
        assert a.dtype == (fdt if "features" in name else dtype)


@needs_cpp
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_float64(cpu_loop, shape, first_order):
    cpu_loop("cpp")
    compare(shape, first_order, torch.float64)


@needs_cpp
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:5])
def test_cpp_float32(cpu_loop, shape, first_order):
    cpu_loop("cpp")
    compare(shape, first_order, torch.float32, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[5]])
def test_torch_small_loop_float64(cpu_loop, shape, first_order):
    # the kernels' oracle, and the CPU's loop where C++ cannot be built
    cpu_loop("torch")
    compare(shape, first_order, torch.float64)


@pytest.mark.parametrize("loop", ["cpp", "torch"])
def test_op_gradcheck_and_opcheck_float64(cpu_loop, loop):
    if loop == "cpp" and cpp_missing:
        pytest.skip("C++ small loop could not be built here")
    cpu_loop(loop)
    gradcheck_and_opcheck(*head_problem(2, 5, 4, 6, 3, seed=4))


def gradcheck_and_opcheck(fs, ys, fq, yq, w, b):
    """gradcheck of the op (2 tasks, 4 queries, 3 ways) and torch.library.opcheck of both ops."""
    inputs = [x.requires_grad_() for x in (fs, fq, w, b)]
    # second order is the true gradient (first order is checked against the reference above)
    assert torch.autograd.gradcheck(
        lambda f, q, ww, bb: ops.adapted_head(f, ys, q, yq, ww, bb, 0.4, 3, False)[:2], inputs)
    torch.library.opcheck(ops.adapted_head, (fs, ys, fq, yq, w, b, 0.4, 3, False))
    # the backward op is not differentiable itself: checked on plain tensors
    fs, fq, w, b = (x.detach() for x in (fs, fq, w, b))
    grads = [torch.randn(2, dtype=fs.dtype), torch.randn(2, 4, 3, dtype=fs.dtype)]
    saved = ops.adapted_head(fs, ys, fq, yq, w, b, 0.4, 3, False)
    torch.library.opcheck(ops.adapted_head_backward,
                          (*grads, fs, ys, fq, yq, w, *saved[1:], 0.4, 3, False))


@needs_triton
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[7], (2, 20, 17, 33, 5, 5),
                                   (1, 12, 70, 9, 64, 2), (1, 130, 5, 7, 5, 2)])
def test_triton_float32_interpreter(cpu_loop, shape, first_order):
    cpu_loop("triton")
    compare(shape, first_order, torch.float32, atol=2e-4, rtol=2e-4)


@needs_triton
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("shape", [(2, 160, 9, 13, 7, 3), (1, 200, 70, 5, 64, 2), (3, 150, 4, 1, 2, 0)])
def test_triton_large_support_sets(cpu_loop, shape, first_order):
    # large support sets: the tiled kernels (H in scratch, tiles of Kss)
    cpu_loop("triton")
    compare(shape, first_order, torch.float32, atol=2e-4, rtol=2e-4)


@needs_triton
@pytest.mark.parametrize("support_rows", [20, 140])
def test_triton_reverse_in_chunks(cpu_loop, monkeypatch, support_rows):
    # a small scratch budget makes the backward launch over chunks of tasks
    from anil_fast.kernels import anil_head
    cpu_loop("triton")
    monkeypatch.setattr(anil_head, "SCRATCH_BYTES", 1)
    compare((3, support_rows, 6, 11, 5, 2), False, torch.float32, atol=2e-4, rtol=2e-4)


@needs_triton
@pytest.mark.parametrize("feature_dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_features(cpu_loop, feature_dtype):
    cpu_loop("triton")
    compare((2, 5, 6, 40, 5, 3), False, torch.float32, feature_dtype=feature_dtype,
            atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("steps", [0, 3])
def test_small_loops_agree_with_the_torch_oracle(steps):
    # each device kernel against the batched-torch oracle, forward and reverse, directly
    from anil_fast.kernels import anil_head
    fs, ys, fq, yq, w, b = head_problem(3, 9, 8, 11, 4, seed=1, dtype=torch.float32)
    z0, kss, aq, kqs = ops.projections(fs, fq, w, b)
    hbar = torch.randn_like(z0)
    want = (*anil_head.torch_inner_loop_forward(z0, kss, ys, aq, kqs, yq, 0.3, steps),
            *anil_head.torch_inner_loop_reverse(z0, kss, ys, hbar, 0.3, steps))
    loops = [ops.CPP_LOOP] * (not cpp_missing) + [ops.TRITON_LOOP] * ops.triton_interpreter()
    assert loops or os.environ.get("ANIL_FAST_ALLOW_NO_CPP") == "1"
    for loop in loops:
        got = (*loop.forward(z0, kss, ys, aq, kqs, yq, 0.3, steps),
               *loop.reverse(z0, kss, ys, hbar, 0.3, steps))
        for name, a, r in zip(["h", "logits", "losses", "z0_bar", "kss_bar"], got, want):
            torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=f"{loop.name}: {name}")


def test_torch_small_loop_matches_reference():
    from anil_fast.kernels import anil_head
    fs, ys, fq, yq, w, b = head_problem(3, 9, 8, 11, 4, seed=1)
    z0, kss, aq, kqs = ops.projections(fs, fq, w, b)
    _, logits, losses = anil_head.torch_inner_loop_forward(z0, kss, ys, aq, kqs, yq, 0.3, 4)
    ref_losses, ref_logits = adapted_query_loss(fs, ys, fq, yq, w, b, inner_lr=0.3, inner_steps=4,
                                                first_order=False, backend="reference")
    torch.testing.assert_close(losses, ref_losses)
    torch.testing.assert_close(logits, ref_logits)


def test_non_contiguous_inputs():
    fs, ys, fq, yq, w, b = head_problem(3, 6, 5, 8, 4, seed=8)
    fs_nc = fs.transpose(0, 1).contiguous().transpose(0, 1)
    w_nc = w.t().contiguous().t()
    assert not fs_nc.is_contiguous() and not w_nc.is_contiguous()
    a = adapted_query_loss(fs_nc, ys, fq, yq, w_nc, b, inner_lr=0.2, inner_steps=3,
                           first_order=False, backend="fused")
    r = adapted_query_loss(fs, ys, fq, yq, w, b, inner_lr=0.2, inner_steps=3, first_order=False,
                           backend="reference")
    torch.testing.assert_close(a, r)


@pytest.mark.parametrize("backend", ["fused", "auto", "reference", "per_task"])
def test_bad_input_is_caught_before_the_op(backend):
    fs, ys, fq, yq, w, b = head_problem(2, 5, 4, 6, 3, dtype=torch.float32)
    kw = dict(inner_lr=0.1, inner_steps=2, first_order=True, backend=backend)
    with pytest.raises(ValueError, match="support_labels"):
        adapted_query_loss(fs, ys + 3, fq, yq, w, b, **kw)
    with pytest.raises(ValueError, match="query_labels"):
        adapted_query_loss(fs, ys, fq, yq - 4, w, b, **kw)
    with pytest.raises(TypeError, match="query_features"):
        adapted_query_loss(fs, ys, fq.double(), yq, w, b, **kw)
    with pytest.raises(ValueError, match="weight"):
        adapted_query_loss(fs, ys, fq, yq, w[:, :5], b, **kw)
    with pytest.raises(ValueError, match="one device"):
        adapted_query_loss(fs, ys, fq, yq.to("meta"), w, b, **kw)


@pytest.mark.parametrize("loop", ["cpp", "triton", "torch"])
def test_op_gives_nan_for_tasks_with_out_of_range_labels(cpu_loop, loop):
    # the op's one contract, whichever kernel runs: NaN loss for exactly the bad tasks, no
    # out-of-bounds read, no host sync (the host check is adapted_query_loss's, above)
    if loop == "cpp" and cpp_missing or loop == "triton" and not ops.triton_interpreter():
        pytest.skip(f"{loop} small loop not available here")
    cpu_loop(loop)
    fs, ys, fq, yq, w, b = head_problem(3, 5, 4, 6, 3, dtype=torch.float32)
    ys_bad, yq_bad = ys.clone(), yq.clone()
    ys_bad[0, 2], yq_bad[2, 1] = 3, -1
    losses = ops.adapted_head(fs, ys_bad, fq, yq_bad, w, b, 0.1, 2, False)[0]
    assert torch.isnan(losses[[0, 2]]).all() and torch.isfinite(losses[1])
    losses = ops.adapted_head(fs, ys, fq, yq, w, b, 0.1, 2, False)[0]
    assert torch.isfinite(losses).all()


def test_torch_compile_fullgraph_cpu():
    fs, ys, fq, yq, w, b = head_problem(3, 5, 6, 8, 5, dtype=torch.float32)
    w.requires_grad_()

    def step(f, q, ww, bb):
        losses, logits = adapted_query_loss(f, ys, q, yq, ww, bb, inner_lr=0.3, inner_steps=4,
                                            first_order=False, backend="fused")
        return losses.mean() + 0.1 * logits.square().mean()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(fs, fq, w, b)
    (grad,) = torch.autograd.grad(out, [w])
    eager = step(fs, fq, w, b)
    (eager_grad,) = torch.autograd.grad(eager, [w])
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("s_rows, dim, runs", [(100, 64, "reference"), (5, 64, "fused")])
def test_auto_dispatch(monkeypatch, s_rows, dim, runs):
    # "auto" runs what auto_prefers_reference says (the rule's speed is the benchmark's to
    # report, benches/test_bench_head.py); the other path is made to fail here
    from anil_fast.models import functional
    def refuse(*args, **kwargs):
        raise AssertionError("auto ran the other path")
    other = "fused_adapted_query_loss" if runs == "reference" else "reference_adapted_query_loss"
    monkeypatch.setattr(ops if runs == "reference" else functional, other, refuse)
    fs, ys, fq, yq, w, b = head_problem(2, s_rows, 3, dim, 5, dtype=torch.float32)
    adapted_query_loss(fs, ys, fq, yq, w, b, inner_lr=0.1, inner_steps=1, first_order=True)
    assert functional.auto_prefers_reference(fs) == (runs == "reference")


def test_backend_names():
    from anil_fast.models.functional import backend_name
    assert backend_name("cpp") == backend_name("triton") == "fused"
    assert backend_name("loop") == "per_task"
    with pytest.raises(ValueError, match="backend"):
        backend_name("cuda")
    with pytest.raises(ValueError, match="CPU and CUDA"):
        fs, ys, fq, yq, w, b = head_problem(1, 2, 2, 3, 2, device="meta")
        adapted_query_loss(fs, ys, fq, yq, w, b, inner_lr=0.1, inner_steps=1, first_order=True,
                           backend="fused")


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_fused_equals_reference(first_order, batched):
    kwargs = dict(inner_lr=0.3, inner_steps=3, first_order=first_order, batched_body=batched)
    assert_trains_alike(make(backend="reference", **kwargs), make(backend="fused", **kwargs))


# Each side of every launch threshold (forward_launch / reverse_launch): the register kernels
# at their footprint limits with 4 and 8 warps, and the tiled kernels just past them.
# (tasks, support rows, query rows, feature dim, ways, inner steps) -> (forward, reverse) kernel
THRESHOLD_SHAPES = [
    ((2, 7, 9, 11, 3, 3), ("_inner_loop_fwd_kernel", "_inner_loop_bwd_kernel")),    # 16 x 16
    ((2, 20, 6, 13, 64, 2), ("_inner_loop_fwd_kernel", "_inner_loop_bwd_kernel")),  # 32 x 64, 8 warps
    ((2, 33, 9, 11, 5, 3), ("_inner_loop_fwd_kernel", "_inner_loop_bwd_kernel")),   # 64 x 16: reverse limit
    ((2, 40, 9, 11, 20, 2), ("_inner_loop_fwd_kernel", "_tiled_bwd_kernel")),       # 64 x 32: forward limit
    ((1, 40, 7, 9, 40, 2), ("_tiled_fwd_kernel", "_tiled_bwd_kernel")),             # 64 x 64
    ((2, 70, 5, 7, 5, 1), ("_tiled_fwd_kernel", "_tiled_bwd_kernel")),              # 128 rows
]


@needs_triton
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("shape, kernels", THRESHOLD_SHAPES)
def test_triton_each_side_of_the_launch_thresholds(cpu_loop, shape, kernels, first_order):
    from anil_fast.kernels import anil_head
    cpu_loop("triton")
    tasks, s_rows, q_rows, dim, ways, steps = shape
    chosen = (anil_head.forward_launch(s_rows, q_rows, ways).kernel,
              anil_head.reverse_launch(s_rows, ways).kernel)
    assert chosen == kernels
    compare(shape, first_order, torch.float32, atol=2e-4, rtol=2e-4)


@needs_triton
@pytest.mark.parametrize("shape", [SHAPES[0], (2, 70, 5, 7, 5, 2)])
def test_triton_float64_falls_back_to_the_torch_loop(cpu_loop, shape):
    # float64 runs the kernels' batched-torch oracle (forward and reverse), gradients included
    cpu_loop("triton")
    compare(shape, False, torch.float64)


@pytest.mark.parametrize("backend, nan", [("fused", True), ("reference", False)])
def test_anil_steps_never_sync_on_labels_with_the_fused_op(backend, nan):
    # ANIL's meta-step leaves out-of-range labels to the fused op (a NaN loss for the task, no
    # host check); the reference backend still checks them (it would index out of bounds)
    from helpers import random_batch
    anil = make(backend=backend, inner_lr=0.3, inner_steps=2)
    batch = random_batch(tasks=3)
    batch.query_y[1, 0] = 9
    if nan:
        with torch.no_grad():
            losses = anil._task_losses(batch)[0]
        assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()
    else:  # checked first by ANIL on a model's first batch, and by the reference op itself
        with pytest.raises(ValueError, match=r"labels must lie in 0\.\.3"):
            anil.meta_loss(batch)
        with pytest.raises(ValueError, match="query_labels"):
            anil._task_losses(batch)
    kw = dict(inner_lr=0.1, inner_steps=1, first_order=True, backend="fused", check_labels=False)
    fs, ys, fq, yq, w, b = head_problem(2, 5, 4, 6, 3)
    assert torch.isnan(adapted_query_loss(fs, ys, fq, yq + 3, w, b, **kw)[0]).all()
    with pytest.raises(ValueError, match="support_labels"):  # the reference checks regardless
        adapted_query_loss(fs, ys + 3, fq, yq, w, b, **{**kw, "backend": "reference"})



# -- a per-task initial head ([T, N, D], [T, N]): prototype initialisation --------------------------

@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[7]])
@pytest.mark.parametrize("loop", ["cpp", "torch"])
def test_per_task_initial_head_float64(cpu_loop, loop, shape, first_order):
    if loop == "cpp" and cpp_missing:
        pytest.skip("C++ small loop could not be built here")
    cpu_loop(loop)
    compare(shape, first_order, torch.float64, per_task=True)


@needs_triton
@pytest.mark.parametrize("first_order", [False, True])
def test_per_task_initial_head_triton_interpreter(cpu_loop, first_order):
    cpu_loop("triton")
    compare(SHAPES[0], first_order, torch.float32, atol=2e-4, rtol=2e-4, per_task=True)


def test_per_task_initial_head_gradcheck_opcheck_and_the_write_ups_loop(cpu_loop):
    cpu_loop("cpp" if not cpp_missing else "torch")
    fs, ys, fq, yq, w, b = head_problem(2, 5, 4, 6, 3, seed=9)
    w, b = per_task_initial_head(w, b, 2, 9)
    gradcheck_and_opcheck(fs, ys, fq, yq, w, b)
    fs, fq, w, b = (x.detach() for x in (fs, fq, w, b))
    for first_order in (False, True):  # the per-task loop of the write-ups agrees too
        kw = dict(inner_lr=0.4, inner_steps=3, first_order=first_order)
        ref = grads_of(lambda f, q, ww, bb: adapted_query_loss(f, ys, q, yq, ww, bb, backend="reference", **kw), [fs, fq, w, b])
        loop = grads_of(lambda f, q, ww, bb: per_task_loop(f, ys, q, yq, ww, bb, 0.4, 3, first_order), [fs, fq, w, b])
        for a, r in zip([*loop[:2], *loop[2]], [*ref[:2], *ref[2]]):
            torch.testing.assert_close(a, r)
    with pytest.raises(ValueError, match="per task"):
        adapted_query_loss(fs, ys, fq, yq, w[:1].expand(3, -1, -1), b, inner_lr=0.1, inner_steps=1,
                           first_order=True)
    with pytest.raises(ValueError, match="bias must have shape"):
        adapted_query_loss(fs, ys, fq, yq, w, b[0], inner_lr=0.1, inner_steps=1, first_order=True)
