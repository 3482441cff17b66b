import math

import pytest
import torch

from anil_fast.models.functional import adapted_query_loss
from helpers import grads_of, head_problem, per_task_loop


def reference(fs, ys, fq, yq, w, b, lr, steps, first_order):
    return adapted_query_loss(fs, ys, fq, yq, w, b, inner_lr=lr, inner_steps=steps,
                              first_order=first_order, backend="reference")


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9, 4, 3), (1, 10, 3, 17, 5, 0), (2, 4, 6, 1, 3, 2)])
def test_reference_equals_per_task_loop(shape, first_order):
    tasks, s_rows, q_rows, dim, ways, steps = shape
    fs, ys, fq, yq, w, b = head_problem(tasks, s_rows, q_rows, dim, ways, seed=sum(shape))
    lr = 0.37
    loop = grads_of(lambda f, q, ww, bb: per_task_loop(f, ys, q, yq, ww, bb, lr, steps, first_order),
                    [fs, fq, w, b])
    ref = grads_of(lambda f, q, ww, bb: reference(f, ys, q, yq, ww, bb, lr, steps, first_order),
                   [fs, fq, w, b])
    torch.testing.assert_close(ref[0], loop[0])
    torch.testing.assert_close(ref[1], loop[1])
    for a, b_ in zip(ref[2], loop[2]):
        torch.testing.assert_close(a, b_)
    if first_order:
        assert torch.count_nonzero(ref[2][0]) == 0  # support features get no gradient


def test_reference_gradcheck():
    # Second order is the true gradient of the forward; first order is by definition not
    # (it is checked against its definition below).
    fs, ys, fq, yq, w, b = head_problem(2, 4, 3, 5, 3, seed=5)
    inputs = [x.requires_grad_() for x in (fs, fq, w, b)]

    def fn(f, q, ww, bb):
        return reference(f, ys, q, yq, ww, bb, 0.5, 3, False)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_first_order_gradcheck_on_query_features():
    # With the inner loop's gradients held constant, the map from (query features, head) to
    # the losses is smooth and its first-order gradient is exact: gradcheck it there.
    fs, ys, fq, yq, w, b = head_problem(2, 4, 3, 5, 3, seed=6)
    fq.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q: reference(fs, ys, q, yq, w, b, 0.5, 3, True), [fq])


def test_first_order_weight_gradient_is_query_gradient_at_adapted_head():
    fs, ys, fq, yq, w, b = head_problem(2, 6, 5, 4, 3, seed=9)
    w.requires_grad_()
    b.requires_grad_()
    losses, _ = reference(fs, ys, fq, yq, w, b, 0.3, 2, True)
    gw, gb = torch.autograd.grad(losses.sum(), (w, b))
    expected_w, expected_b = torch.zeros_like(w), torch.zeros_like(b)
    for t in range(2):  # adapt each task by hand, then take the query gradient there
        wt, bt = w.detach().clone(), b.detach().clone()
        for _ in range(2):
            p = (fs[t] @ wt.T + bt).softmax(-1)
            g = (p - torch.nn.functional.one_hot(ys[t], 3)) / 6
            wt, bt = wt - 0.3 * g.T @ fs[t], bt - 0.3 * g.sum(0)
        pq = (fq[t] @ wt.T + bt).softmax(-1)
        gq = (pq - torch.nn.functional.one_hot(yq[t], 3)) / 5
        expected_w += gq.T @ fq[t]
        expected_b += gq.sum(0)
    torch.testing.assert_close(gw, expected_w)
    torch.testing.assert_close(gb, expected_b)


def test_reference_under_no_grad_matches():
    fs, ys, fq, yq, w, b = head_problem(3, 5, 4, 6, 5, seed=2)
    a = reference(fs, ys, fq, yq, w, b, 0.2, 4, False)
    with torch.no_grad():
        c = reference(fs, ys, fq, yq, w.requires_grad_(), b, 0.2, 4, True)
    torch.testing.assert_close(a[0], c[0])
    torch.testing.assert_close(a[1], c[1])


def _bad(**changes):
    fs, ys, fq, yq, w, b = head_problem(2, 5, 4, 6, 5, dtype=torch.float32)
    args = dict(support_features=fs, support_labels=ys, query_features=fq, query_labels=yq,
                weight=w, bias=b, inner_lr=0.1, inner_steps=2, first_order=True,
                backend="reference")
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, word", [
    (dict(support_labels=torch.full((2, 5), 5)), ValueError, "support_labels"),
    (dict(query_labels=torch.full((2, 4), -1)), ValueError, "query_labels"),
    (dict(support_labels=torch.zeros(2, 5)), TypeError, "support_labels"),
    (dict(support_features=torch.zeros(2, 5, 6, dtype=torch.int64)), TypeError, "support_features"),
    (dict(query_features=torch.zeros(2, 4, 7)), ValueError, "query_features"),
    (dict(query_features=torch.zeros(3, 4, 6)), ValueError, "query_features"),
    (dict(support_labels=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "support_labels"),
    (dict(weight=torch.zeros(5, 7)), ValueError, "weight"),
    (dict(bias=torch.zeros(4)), ValueError, "bias"),
    (dict(inner_steps=-1), ValueError, "inner_steps"),
    (dict(inner_steps=1.5), TypeError, "inner_steps"),
    (dict(inner_lr=math.nan), ValueError, "inner_lr"),
    (dict(inner_lr=math.inf), ValueError, "inner_lr"),
    (dict(backend="cuda-magic"), ValueError, "backend"),
    (dict(weight=torch.zeros(5, 6, dtype=torch.float64)), TypeError, "weight"),
])
def test_bad_input(changes, error, word):
    with pytest.raises(error, match=word):
        adapted_query_loss(**_bad(**changes))


def test_loop_backend_takes_what_the_reference_takes():
    """int32 labels and fp16 features: the per-task loop computes what the reference does."""
    fs, ys, fq, yq, w, b = head_problem(3, 7, 9, 13, 4, dtype=torch.float32, seed=5)
    args = (fs.half(), ys.int(), fq.half(), yq.int(), w.requires_grad_(), b.requires_grad_())
    kwargs = dict(inner_lr=0.3, inner_steps=2, first_order=False)
    ref_loss, ref_logits = adapted_query_loss(*args, backend="reference", **kwargs)
    loop_loss, loop_logits = adapted_query_loss(*args, backend="per_task", **kwargs)
    torch.testing.assert_close(loop_loss, ref_loss)
    torch.testing.assert_close(loop_logits, ref_logits)
