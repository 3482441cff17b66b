"""A few-shot classifier adapted to your classes, as a file that runs without anil-fast.

    clf = FewShotClassifier.from_checkpoint("runs/s2").fit("my_classes/")
    clf.export("model.pt2")      # torch.export program: torch.export.load(path).module()
    clf.export("model.onnx")     # ONNX (the dynamo exporter): onnxruntime, any ONNX runtime
    clf.export("model.pt")       # TorchScript: torch.jit.load(path)

What is frozen into the graph (`AdaptedClassifier`): the run's preprocessing (uint8 to 0..1,
channels, Omniglot's ink inversion, the resize from the input size to the model's), the body
with BatchNorm as `predict` uses it (the support set's statistics, or the running ones), and
the head adapted to the support set (its inner steps run once, here). It takes images [N, C,
H, W] (uint8 by default, or float in 0..1) and returns class probabilities [N, classes]; the
class names travel in the file (`classes.json` in the .pt2 and .pt archives, metadata
"classes" in the ONNX model). The graph computes in fp32 (a bf16 run's answers move within
bf16's rounding). A body torch.export cannot trace is refused naming its innermost layer that
fails.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anil_fast.models.batchnorm import batch_statistics_of
from anil_fast.errors import InputError, InputTypeError, is_int
from anil_fast.models.anil import task_feature_scale
from anil_fast.models.functional import adapted_head

FORMATS = {".pt2": "export", ".onnx": "onnx", ".pt": "torchscript"}
# ITU-R 601 luma, the weights Pillow's convert("L") uses
LUMA = (0.299, 0.587, 0.114)
MAX_BATCH = 65536


def resize_matrix(source: int, target: int, omniglot: bool) -> torch.Tensor:
    """[target, source]: the 1-D resize predict's preprocessing applies along each axis, as a
    matrix, so the resize is two matmuls that every exporter and runtime takes. Omniglot: area
    averaging (predict's F.interpolate(mode="area")); other data: Pillow's bilinear filter (the
    folder loader's resize), read off Pillow itself on a float image."""
    if omniglot:
        eye = torch.eye(source).view(source, 1, source, 1)
        return F.interpolate(eye, size=(target, 1), mode="area").view(source, target).T.contiguous()
    import numpy as np
    from PIL import Image
    eye = Image.fromarray(np.eye(source, dtype=np.float32), mode="F")  # column i: row i lit
    out = np.asarray(eye.resize((source, target), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy(out.copy())  # [target, source]: out[j, i] = row i's weight in j


class AdaptedClassifier(nn.Module):
    """images [N, input_channels, input_size, input_size] -> probabilities [N, classes]."""

    def __init__(self, body: nn.Module, weight: torch.Tensor, bias: torch.Tensor,
                 image_size: int, channels: int, omniglot: bool, input_size: int,
                 input_channels: int, uint8: bool, unit_features: bool = False):
        super().__init__()
        self.body = body
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1))
        self.register_buffer("resize", resize_matrix(input_size, image_size, omniglot))
        self.image_size, self.channels, self.omniglot = image_size, channels, omniglot
        self.input_size, self.input_channels, self.uint8 = input_size, input_channels, uint8
        self.unit_features = unit_features  # feature_norm "unit" (its scales are in the weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        if self.uint8:
            x = x / 255.0
        if self.input_channels == 3 and self.channels == 1:
            x = (x * self.luma).sum(1, keepdim=True)
        elif self.input_channels == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.omniglot:
            x = 1.0 - x  # Omniglot's ink is 1 on paper 0
        if self.input_size != self.image_size:
            x = self.resize @ x @ self.resize.T
        features = self.body(x)
        if self.unit_features:
            features = F.normalize(features, dim=-1)
        logits = features @ self.weight.T + self.bias
        return torch.softmax(logits, dim=-1)


def frozen_body(anil, support: torch.Tensor, bn_mode: str) -> tuple[nn.Module, torch.Tensor]:
    """(a copy of the body in eval mode with BatchNorm frozen as predict uses it, the support
    features). "support": every BatchNorm layer's statistics are the support set's (mean and
    biased variance, as batchnorm.features_with_support_statistics normalises with);
    "running": the running statistics."""
    if bn_mode not in ("support", "running"):
        raise InputError(f"bn_mode: an exported model answers each image on its own, with the "
                         f"support set's BatchNorm statistics ('support') or the running ones "
                         f"('running'); {bn_mode!r} would make each answer depend on the other "
                         f"images of its batch")
    body = copy.deepcopy(anil.body).float().eval()
    body.to(memory_format=torch.contiguous_format)
    for p in body.parameters():
        p.requires_grad_(False)
    x = support.float().contiguous()
    if bn_mode == "support":
        with torch.no_grad():
            _, captured = batch_statistics_of(body, body, x)
        for bn, (mean, var) in captured.items():  # eval mode then normalises with exactly these
            bn.track_running_stats = True
            bn.register_buffer("running_mean", mean)
            bn.register_buffer("running_var", var)
        body.eval()
    with torch.no_grad():
        features = body(x)
    return body, features


def adapted_classifier(clf, input_size: int | None = None, input_channels: int | None = None,
                       input_dtype: str = "uint8") -> AdaptedClassifier:
    """The module an export writes, from a fitted FewShotClassifier."""
    if clf.support is None:
        raise InputError("fit() the support set first: the exported head is adapted to it")
    if clf.test_shifts:
        raise InputError("export: a classifier with test_shifts scores each image at several "
                         "shifts, which the exported file does not; build it with test_shifts=0")
    input_size = clf.image_size if input_size is None else input_size
    input_channels = clf.channels if input_channels is None else input_channels
    if not is_int(input_size) or not 1 <= input_size <= 4096:
        raise InputError(f"input_size must be an int in 1..4096, got {input_size!r}")
    if input_channels not in (1, 3):
        raise InputError(f"input_channels must be 1 or 3, got {input_channels!r}")
    if input_dtype not in ("uint8", "float"):
        raise InputError(f"input_dtype must be 'uint8' or 'float', got {input_dtype!r}")
    anil = clf.anil
    support, labels = clf.support
    body, body_features = frozen_body(anil, support.cpu(), clf.bn_mode)
    steps = anil.inner_steps if clf.inner_steps is None else clf.inner_steps
    labels = labels.cpu()
    device = clf.device
    # the support features the head adapts on (ANIL.head_features); the query side's scalars,
    # "task"'s norm and the query scale, are folded into the adapted weight: W (c f) = (c W) f
    features = anil.head_features(body_features[None], body_features[None])[0][0]
    scale = task_feature_scale(body_features) if anil.feature_norm == "task" else 1.0
    if hasattr(anil, "query_scale"):
        scale = scale * anil.query_scale.detach().float().cpu()
    with torch.no_grad():  # "learned", "zero" or the support's prototypes, as predict starts
        w0, b0 = anil.initial_head(features.to(device)[None], labels.to(device)[None],
                                   len(clf.classes))
    weight, bias = adapted_head(w0.reshape(-1, features.shape[-1]).float().cpu(),
                                b0.reshape(-1).float().cpu(), features, labels,
                                inner_lr=anil.inner_lr, inner_steps=steps)
    return AdaptedClassifier(body, weight * scale, bias, clf.image_size, clf.channels,
                             clf.omniglot, input_size, input_channels, input_dtype == "uint8",
                             unit_features=anil.feature_norm == "unit")


def example_input(module: AdaptedClassifier, batch: int = 2) -> torch.Tensor:
    shape = (batch, module.input_channels, module.input_size, module.input_size)
    if module.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def _failing_layer(module: nn.Module, example: torch.Tensor) -> str:
    """The innermost submodule torch.export cannot trace, found by exporting each submodule on
    the input it received in an eager run (leaves first)."""
    inputs, handles = {}, []
    for name, sub in module.named_modules():
        handles.append(sub.register_forward_pre_hook(
            lambda m, args, name=name: inputs.setdefault(name, args)))
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    names = sorted((n for n in inputs if n), key=lambda n: -n.count("."))
    for name in names:
        try:
            torch.export.export(module.get_submodule(name), inputs[name])
        except Exception as exc:  # noqa: BLE001 - any tracing failure names the layer
            sub = module.get_submodule(name)
            return f"{name} ({type(sub).__name__}: {str(exc).splitlines()[0][:160]})"
    return "the top level"


def export_program(module: AdaptedClassifier):
    example = example_input(module)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        return torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})
    except Exception as exc:  # noqa: BLE001 - reported with the layer that fails
        layer = _failing_layer(module, example)
        raise InputError(f"export: torch.export cannot trace this body; the layer that fails: "
                         f"{layer}. ({type(exc).__name__})") from exc


def export(clf, path, format: str | None = None, input_size: int | None = None,
           input_channels: int | None = None, input_dtype: str = "uint8") -> Path:
    """Write the adapted classifier to `path` as a torch.export program (.pt2), an ONNX model
    (.onnx) or TorchScript (.pt); `format` ("export", "onnx", "torchscript") overrides the
    suffix. `input_size`, `input_channels`: the images the file will be given (default: the
    model's own size and channels; an Omniglot run's drawings are 105 px); `input_dtype`:
    "uint8" (0..255) or "float" (0..1)."""
    path = Path(path)
    if format is None:
        if path.suffix not in FORMATS:
            raise InputError(f"export: {path} has no known suffix ({', '.join(FORMATS)}); give "
                             f"format= one of {sorted(set(FORMATS.values()))}")
        format = FORMATS[path.suffix]
    if format not in FORMATS.values():
        raise InputTypeError(f"format must be one of {sorted(set(FORMATS.values()))}, got {format!r}")
    module = adapted_classifier(clf, input_size, input_channels, input_dtype)
    classes = json.dumps([str(c) for c in clf.classes])
    program = export_program(module)  # refuses an untraceable body, whatever the format
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "export":
        torch.export.save(program, path, extra_files={"classes.json": classes})
    elif format == "torchscript":
        scripted = torch.jit.trace(module, (example_input(module),), check_trace=False)
        torch.jit.save(scripted, str(path), _extra_files={"classes.json": classes})
    else:
        _save_onnx(module, path, classes)
    return path


def _save_onnx(module: AdaptedClassifier, path: Path, classes: str) -> None:
    try:
        import onnx  # noqa: F401 - the dynamo exporter needs onnx and onnxscript
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise InputError("export: ONNX needs the onnx and onnxscript packages: pip install "
                         "'anil-fast[export]'") from exc
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.onnx.export(module, (example_input(module),), dynamo=True,
                                dynamic_shapes={"images": {0: batch}}, input_names=["images"],
                                output_names=["probabilities"], verbose=False)
    program.save(str(path))
    import onnx
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "classes", classes
    onnx.save(model, str(path))
