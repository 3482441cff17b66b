"""The model and its op: ANIL (anil.py), the head loss and its backends (functional.py), the
fused op (ops.py), per-task BatchNorm (batchnorm.py) and the bodies (bodies.py, timm_bodies.py).

`anil_fast.models` is also the bodies' namespace, as torchvision.models is: `models.build`,
`models.conv4`, `models.resnet18`, ..."""
from anil_fast.config import MIN_IMAGE_SIZE, MODELS
from anil_fast.models.bodies import (build, conv4, count_parameters,
                                     feature_dim_of, resnet12, resnet18, vgg11_bn)

__all__ = ["MODELS", "MIN_IMAGE_SIZE", "build", "conv4", "resnet12", "resnet18", "vgg11_bn",
           "count_parameters", "feature_dim_of"]
