"""megatron_kd: logit knowledge distillation with long-context extension on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="megatron_kd",
    version="0.1.0",
    description="Megatron-style logit knowledge distillation with long-context extension",
    packages=find_packages(include=["megatron_kd", "megatron_kd.*"]),
    package_data={"megatron_kd": ["recipes/*.yaml", "recipes/reproduce/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.17",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "numpy",
        "pyyaml",
        "tensorboard",
        "tqdm",
        "psutil",  # dist_checkpointing's async writer needs it
        "matplotlib",  # eval heatmaps, analysis figures
        "safetensors",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # Hugging Face interop: import/export, GGUF (SmolLM2), parity tests against transformers
        "hf": ["transformers>=5.0,<6", "gguf>=0.10"],
        # triton: the Triton fused KD loss's CPU tests (its interpreter) and sm_90 compile check;
        # 3.7.1 is the version torch 2.13's CUDA wheel pins, so a GPU install keeps one Triton
        "test": ["pytest>=8", "pytest-timeout", "mpi4py>=3.1", "transformers>=5.0,<6", "gguf>=0.10",
                 "triton==3.7.1; platform_system == 'Linux'", "deepspeed==0.19.8"],
        # `train --engine deepspeed` (megatron_kd/deepspeed_kd.py): HF student + teacher under ZeRO
        "deepspeed": ["deepspeed>=0.19", "transformers>=5.0,<6"],
        "triton": ["triton==3.7.1; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["megatron-kd=megatron_kd.cli:main"]},
)
