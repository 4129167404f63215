from setuptools import find_packages, setup

setup(
    name="megatron_transfusion",
    version="0.1.0",
    description="Transfusion-style multimodal pretraining on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_transfusion*", "kernels*", "data_prep*", "checkpoints*"]),
    package_data={"megatron_transfusion": ["configs/*.yaml"]},
    install_requires=[
        # torch 2.14.1 + torchvision 0.29.1 is the pairing under which mosaicml-streaming
        # imports; megatron-core 0.16.1 is the newest release for Python 3.11.
        "torch==2.14.1",
        "megatron-core==0.16.1",
        "numpy",
        "pyyaml",
    ],
    extras_require={
        # GPU-only kernels, imported lazily. NEVER the PyPI package named "apex":
        # NVIDIA Apex builds only from its source.
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
        "dev": ["pytest"],
    },
    entry_points={
        "console_scripts": [
            "mtf-config=megatron_transfusion.cli:config_main",
            "mtf-overfit=megatron_transfusion.cli:overfit_main",
        ]
    },
)
