"""megatron-paced: PACED-RL post-training of LLMs on NVIDIA Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-paced",
    version="0.1.0",
    description="PACED-RL (GFlowNet partition function as a difficulty scheduler) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_paced", "megatron_paced.*"]),
    install_requires=[
        # On a CPU-only machine install torch's CPU build first (the Makefile does); an
        # unpinned torch from PyPI is the CUDA build.
        "torch>=2.6",
        # 0.16.x is the last release for Python 3.11; 0.17+ need Python 3.12.
        "megatron-core>=0.16.1",
        "numpy",
        "packaging",
        "psutil",  # dist_checkpointing.save needs it
        "pyyaml",
        "safetensors",  # HF checkpoints and disk weight sync
    ],
    extras_require={
        # accelerate and gguf: transformers reads the SmolLM2 GGUF file (tools/fetch_smollm2.py)
        # only with both installed.
        # pytest-xdist: `make test` runs the suite on 2 workers (one file per worker at a time).
        "test": ["pytest>=8", "pytest-xdist", "math-verify", "pyarrow", "transformers",
                 "matplotlib", "accelerate", "gguf"],
        "plot": ["matplotlib"],
        "hf": ["transformers"],
        "wandb": ["wandb"],
        "math": ["math-verify"],
        "data": ["pyarrow"],
        # The SGLang range the client is written and tested against (README "SGLang"):
        # 0.5.21 pins torch 2.13.0, the Makefile's; 0.5.22 and 0.5.23 pin torch 2.14.1 and
        # run as servers from their own environment (--sglang-launch-command).
        "sglang": ["sglang==0.5.21"],
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "paced-train=megatron_paced.train:main",
            "paced-run=megatron_paced.launch:main",
        ],
    },
)
