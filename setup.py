from setuptools import find_packages, setup

setup(
    name="pangu_moe",
    version="0.1.0",
    description="PanGu-Sigma-style sparse MoE training with locality-aware routing (LocMoE) on MindSpore",
    packages=find_packages(include=["pangu_moe", "pangu_moe.*"]),
    package_data={"pangu_moe": ["configs/*.yaml", "launch/*.sh"]},  # found from the installed package
    python_requires=">=3.9,<3.13",
    install_requires=[
        "mindspore>=2.10,<2.11",
        "numpy>=1.25,<2",  # MindSpore 2.10 breaks with numpy 2 but does not pin it
        "pyyaml",
        "scipy",  # t quantiles for the studies' confidence intervals (MindSpore requires it too)
        # Byte-level BPE for prepare-data: trains from a stream in Rust; tokenizer.json is read by MindFormers
        # and HF alike. Pinned to one minor version so a tokenizer trained here tokenizes alike everywhere.
        "tokenizers>=0.23,<0.24",
    ],
    # tensorboard: training also writes its metrics as TensorBoard events (RUN_DIR/tensorboard).
    extras_require={"test": ["pytest", "matplotlib", "tensorboardX"], "plot": ["matplotlib"],
                    "tensorboard": ["tensorboardX"]},
    entry_points={"console_scripts": ["pangu-moe=pangu_moe.cli:main"]},
)
