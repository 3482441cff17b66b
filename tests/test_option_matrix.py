"""Every combination of the switches a user can turn on, on tiny shapes on the CPU.

- All of head init x BatchNorm mode x backend x order (96 models), fp32: one meta-gradient,
  evaluation, predict and a save/load, each against the reference (plain autograd, per-task
  body, NCHW) built from the same weights, where they must agree.
- Pairwise over every switch of the Python API (those, the head's feature norm, precision,
  batched or per-task body, channels_last, torch.compile): each pair of values in at least one
  model, the same checks (bf16 against the reference in bf16, within bf16's rounding).
- Pairwise over every switch of the command line (head init, feature norm, BatchNorm mode,
  precision with auto, backend, order, capture, compile, shift augmentation in training and
  at test time): `train`, `eval` and `predict` as a user runs them.
- What is not supported is refused before anything runs, with an error naming the setting.
"""
import io
import json

import pytest
import torch

from anil_fast import ANIL, FewShotClassifier, MetaOptimizer
from anil_fast import models
from anil_fast.config import BACKENDS, BN_MODES, FEATURE_NORMS, HEAD_INITS, PRECISIONS
from anil_fast.use.predict import QUERY_DEPENDENT_BN_MODES
from helpers import colour_classes, pairwise, random_batch, run_cli

WAYS, SIZE = 3, 16


def build(head_init="learned", bn_mode="transductive", backend="auto", first_order=True,
          precision="fp32", batched_body=None, channels_last=False, compile=False,
          feature_norm="none") -> ANIL:
    torch.manual_seed(0)  # every combination starts from the same weights
    body, head = models.build("conv4", WAYS, SIZE)
    return ANIL(body, head, inner_lr=0.3, inner_steps=2, first_order=first_order, backend=backend,
                precision=precision, batched_body=batched_body, channels_last=channels_last,
                compile=compile, joint_batchnorm=bn_mode == "joint", head_init=head_init,
                feature_norm=feature_norm)


def batch(seed=0):
    return random_batch(tasks=2, ways=WAYS, shots=2, queries=2, size=SIZE, seed=seed,
                        dtype=torch.float32)


def meta_gradient(anil: ANIL) -> tuple[torch.Tensor, dict, dict]:
    anil.train()
    anil.zero_grad(set_to_none=True)
    sums, total = anil.meta_backward(batch())
    grads = {n: p.grad.clone() for n, p in anil.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in anil.named_buffers()}
    return sums[0] / total, grads, buffers


def predict_mode(bn_mode: str) -> str:
    return "support" if bn_mode in QUERY_DEPENDENT_BN_MODES else bn_mode


def answers(anil: ANIL, bn_mode: str) -> dict:
    """Evaluation's logits before and after adaptation, and predict's probabilities."""
    b = batch(1)
    before, after = anil.adapted_logits(b, bn_mode=bn_mode)
    clf = FewShotClassifier(anil, SIZE, 1, bn_mode=predict_mode(bn_mode))
    proba = clf.fit(b.support_x[0], b.support_y[0].tolist()).predict_proba(b.query_x[0])
    return {"before": before, "after": after, "predict": proba}


def check_against_reference(bn_mode, tolerance, **switches):
    anil = build(bn_mode=bn_mode, **switches)
    # the reference in the same precision: bf16 rounds the body's convolutions either way
    reference = build(bn_mode=bn_mode, head_init=switches.get("head_init", "learned"),
                      first_order=switches.get("first_order", True), backend="reference",
                      batched_body=False, precision=switches.get("precision", "fp32"),
                      feature_norm=switches.get("feature_norm", "none"))
    # the meta-gradient and the running statistics it leaves
    loss, grads, buffers = meta_gradient(anil)
    ref_loss, ref_grads, ref_buffers = meta_gradient(reference)
    assert grads.keys() == ref_grads.keys()
    torch.testing.assert_close(loss, ref_loss, **tolerance)
    scale = max(g.abs().max() for g in ref_grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g / scale, ref_grads[name] / scale, **tolerance, msg=name)
    for name, b in buffers.items():
        torch.testing.assert_close(b.float(), ref_buffers[name].float(), **tolerance, msg=name)
    # evaluation and predict, with the same weights
    ours, theirs = answers(anil, bn_mode), answers(reference, bn_mode)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], **tolerance, msg=key)
    # one meta-step moves the weights and keeps them finite
    snapshot = [p.detach().clone() for p in anil.parameters()]
    out = MetaOptimizer(anil).step(batch(2))
    assert torch.isfinite(out["loss"])
    assert any(not torch.equal(p, q) for p, q in zip(anil.parameters(), snapshot))
    # save and load: a model of the same switches answers exactly alike
    buffer = io.BytesIO()
    torch.save(anil.state_dict(), buffer)
    buffer.seek(0)
    loaded = build(bn_mode=bn_mode, **switches)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in answers(loaded, bn_mode).items():
        torch.testing.assert_close(value, answers(anil, bn_mode)[key], rtol=1e-5, atol=1e-6, msg=key)


FP32 = dict(rtol=2e-4, atol=2e-5)
# bf16 keeps 8 bits of mantissa: the fast paths round in another order than the reference
BF16 = dict(rtol=0.05, atol=0.05)


@pytest.mark.parametrize("first_order", [True, False], ids=["first", "second"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn_mode", BN_MODES)
@pytest.mark.parametrize("head_init", HEAD_INITS)
def test_every_model_combination_in_fp32_agrees_with_the_reference(head_init, bn_mode, backend,
                                                                   first_order):
    check_against_reference(bn_mode, FP32, head_init=head_init, backend=backend,
                            first_order=first_order)


API_SWITCHES = dict(head_init=HEAD_INITS, feature_norm=FEATURE_NORMS, bn_mode=BN_MODES,
                    precision=PRECISIONS,
                    backend=BACKENDS, batched_body=(None, True, False),
                    channels_last=(False, True), first_order=(True, False),
                    compile=(False, "aot_eager"))
API_ROWS = pairwise(API_SWITCHES)


def test_the_rows_cover_every_pair_of_switch_values():
    for rows, switches in ((API_ROWS, API_SWITCHES), (CLI_ROWS, CLI_SWITCHES)):
        names = list(switches)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                seen = {(r[a], r[b]) for r in rows}
                assert seen == {(x, y) for x in switches[a] for y in switches[b]}, (a, b)


@pytest.mark.parametrize("row", API_ROWS, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_pairwise_api_switches_agree_with_the_reference(row):
    row = dict(row)
    tolerance = BF16 if row["precision"] == "bf16" else FP32
    check_against_reference(row.pop("bn_mode"), tolerance, **row)


# -- the command line ---------------------------------------------------------------------------

CLI_SWITCHES = dict(head_init=HEAD_INITS, feature_norm=FEATURE_NORMS, bn_mode=BN_MODES,
                    precision=("auto", *PRECISIONS),
                    backend=BACKENDS, order=("first", "second"), capture=(False, True),
                    compile=(False, True), augment_shift=(0, 1), test_shifts=(0, 1),
                    eval_ways=(None, 2))
CLI_ROWS = pairwise(CLI_SWITCHES)


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    colour_classes(root / "data", range(16), 4, seed=0)
    colour_classes(root / "support", (40, 41, 42), 1, seed=1)
    colour_classes(root / "query", (40, 41, 42), 1, seed=2)
    return root


@pytest.mark.parametrize("row", CLI_ROWS, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_pairwise_cli_switches_train_evaluate_and_predict(row, classes, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setenv("ANIL_FAST_OFFLINE", "1")
    if row["compile"]:  # the default backend's C++ build takes minutes on 2 cores: its wiring
        compile_ = torch.compile  # is what is checked here (test_anil checks its numbers)
        monkeypatch.setattr(torch, "compile", lambda m, **k: compile_(m, backend="aot_eager"))
    out = tmp_path / "run"
    flags = ["--head-init", row["head_init"], "--feature-norm", row["feature_norm"],
             "--bn-mode", row["bn_mode"], "--precision",
             row["precision"], "--backend", row["backend"],
             "--first-order" if row["order"] == "first" else "--second-order",
             "--capture" if row["capture"] else "--no-capture",
             "--compile" if row["compile"] else "--no-compile",
             "--augment-shift", row["augment_shift"],
             *(["--eval-ways", row["eval_ways"]] if row["eval_ways"] else [])]
    code, text = run_cli(capsys, "train", "--data", classes / "data", "--image-size", SIZE, "--ways",
                     WAYS, "--queries", 1, "--meta-batch", 2, "--meta-steps", 2, "--endless",
                     "--inner-steps", 2, "--test-tasks", 2, "--device", "cpu", "--no-progress",
                     "--out", out, *flags)
    assert code == 0, text
    assert "accuracy after adaptation" in text and ("capture: CUDA graphs" in text) == row["capture"]
    # the result says what it was measured with
    features = "" if row["feature_norm"] == "none" else f" on {row['feature_norm']}-normalised features"
    model = f"model: conv4, head {row['head_init']}{features}, inner lr "
    assert model in text and f"{row['order']} order, precision " in text, text
    assert ("trained with images shifted by up to 1 px" in text) == bool(row["augment_shift"])
    assert ("3-way tasks, scored on 2-way ones" in text) == bool(row["eval_ways"]), text
    code, text = run_cli(capsys, "eval", "--checkpoint", out, "--tasks", 2, "--device", "cpu", "--json")
    assert code == 0, text
    assert '"bn_mode": "%s"' % row["bn_mode"] in text
    assert json.loads(text.strip().splitlines()[-1])["model_settings"].startswith(model[7:])
    code, text = run_cli(capsys, "predict", "--checkpoint", out, "--support", classes / "support",
                     "--query", classes / "query", "--device", "cpu", "--test-shifts",
                     row["test_shifts"])
    shifts = ", test-time shifts within 1 px" if row["test_shifts"] else ""
    assert code == 0 and f"(BatchNorm: {predict_mode(row['bn_mode'])}{shifts})" in text, text


@pytest.mark.parametrize("args, words", [
    (["--backend", "triton-ish"], "backend must be one of"),
    (["--precision", "fp8"], "precision must be one of"),
    (["--head-init", "random"], "head_init must be one of"),
    (["--feature-norm", "l2"], "feature_norm must be one of"),
    (["--dataset", "cifar-fs", "--within-alphabet", "0.5"], "within_alphabet is for Omniglot"),
    (["--within-alphabet", "1.5"], "within_alphabet must be a share in 0..1"),
    (["--augment-shift", "-1"], "augment_shift must be a whole number of pixels >= 0"),
    (["--image-size", "28", "--augment-shift", "14"], "below half the image size (28 px)"),
    (["--bn-mode", "batch"], "bn_mode must be one of"),
    (["--device", "meta"], "cpu and cuda devices only"),
])
def test_unsupported_values_are_refused_before_anything_runs(args, words, tmp_path, capsys):
    code, text = run_cli(capsys, "train", "--out", tmp_path / "run", *args)
    assert code == 2 and words in text, text
    assert not (tmp_path / "run").exists()


def test_the_fused_backend_where_it_has_no_kernel_is_refused_naming_it():
    from anil_fast.models.functional import adapted_query_loss
    with pytest.raises(ValueError, match="backend 'fused' has kernels for CPU and CUDA"):
        f = torch.zeros(1, 2, 4, device="meta")
        y = torch.zeros(1, 2, dtype=torch.int64, device="meta")
        adapted_query_loss(f, y, f, y, torch.zeros(2, 4, device="meta"),
                           torch.zeros(2, device="meta"), inner_lr=0.1, inner_steps=1,
                           first_order=True, backend="fused")
