import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', open("mlit/__init__.py", encoding="utf-8").read()).group(1)
DEPLOY = ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"]

setup(
    name="mlit",
    version=VERSION,
    description="mLiT / mmLiT: Mixture-of-Experts lightweight vision transformers with fused Triton MoE kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mlit", "mlit.*", "mlit_kernels", "mlit_kernels.*"]),
    install_requires=[
        "torch>=2.5",  # SDPA enable_gqa
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "scipy",          # .mat readers for SVHN and Flowers102
        "pillow",         # Flowers102 JPEG decoding, `mlit predict` image files
        "tqdm",           # progress bars
        "safetensors",    # final weights
        "matplotlib",     # `mlit plot`
    ],
    extras_require={
        # `mlit export` (ONNX) and running the exported file; onnxscript is torch.onnx's exporter.
        "deploy": DEPLOY,
        # timm: the layer tested inside timm's own models (tests/moe/test_timm.py); Liger-Kernel: a peer
        # measured beside this project's kernels (bench/peers.py, tests/app/test_peers.py), pinned.
        "test": ["pytest>=7", "pytest-benchmark>=4", "timm>=1.0", "liger-kernel==0.8.5", *DEPLOY],
    },
    entry_points={"console_scripts": ["mlit = mlit.cli:main"]},
)
