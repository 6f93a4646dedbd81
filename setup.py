from setuptools import find_packages, setup

setup(
    name="mlit",
    version="0.1.0",
    description="mLiT / mmLiT: Mixture-of-Experts lightweight vision transformers with fused Triton MoE kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mlit", "mlit.*", "mlit_kernels", "mlit_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "scipy",          # .mat readers for SVHN and Flowers102
        "pillow",         # Flowers102 JPEG decoding
        "tqdm",           # progress bars
        "safetensors",    # final weights
        "matplotlib",     # `mlit plot`
    ],
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4"]},
    entry_points={"console_scripts": ["mlit = mlit.cli:main"]},
)
