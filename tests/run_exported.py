"""Runs an exported classifier as its user would: plain torch (or onnxruntime), no anil-fast.

python run_exported.py FORMAT MODEL IMAGES.npy OUT.npy: writes the probabilities to OUT.npy
and prints the class names stored in the file. anil_fast cannot be imported here (a finder
refuses it), so the file must hold everything it needs."""
import json
import sys


class NoAnilFast:
    def find_spec(self, name, path=None, target=None):
        if name == "anil_fast" or name.startswith("anil_fast."):
            raise ImportError("an exported model must run without anil_fast")


sys.meta_path.insert(0, NoAnilFast())

import numpy as np  # noqa: E402
import torch  # noqa: E402

fmt, model, images, out = sys.argv[1:5]
x = torch.from_numpy(np.load(images))
if fmt == "export":
    extra = {"classes.json": ""}
    proba = torch.export.load(model, extra_files=extra).module()(x)
    classes = json.loads(extra["classes.json"])
elif fmt == "torchscript":
    extra = {"classes.json": ""}
    proba = torch.jit.load(model, _extra_files=extra)(x)
    classes = json.loads(extra["classes.json"])
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    proba = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
assert "anil_fast" not in sys.modules
np.save(out, proba.detach().numpy())
print(json.dumps(classes))
