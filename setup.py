"""pifi_jax: PiFi, PEFT, IST and PEFT transfer for language models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="pifi_jax",
    version="0.1.0",
    description=(
        "Plug frozen LLM layers into small encoders, parameter-efficient fine-tuning and sparse "
        "tuning, in JAX/Flax."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pifi_jax", "pifi_jax.*"]),
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "chex>=0.1.86",
        "numpy>=1.24",
        "scipy>=1.10",
        "absl-py>=2.0",
        "ml-collections>=0.1.1",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        # llama.cpp GGUF checkpoints (numpy only).
        "gguf>=0.10",
        "datasets>=2.19",
        "pandas>=2.0",
        # Host-side generation metrics: ROUGE (with stemming) and sacrebleu BLEU / chrF.
        "rouge-score>=0.1.2",
        "sacrebleu>=2.4",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
        "matplotlib>=3.7",
    ],
    extras_require={
        # PyTorch reference models for parity tests and pytorch_model.bin checkpoints.
        "torch": ["torch>=2.1"],
        "tfds": ["tensorflow-datasets>=4.9", "tensorflow-cpu>=2.15"],
        # Accelerators: jax with its CUDA 12 wheels (NVIDIA GPUs), or with libtpu (Cloud TPU,
        # Colab's TPU runtime). Same floor as jax above.
        "cuda": ["jax[cuda12]>=0.4.30"],
        "tpu": ["jax[tpu]>=0.4.30"],
        "test": [
            "pytest>=8",
            # The suite runs on two workers (-n 2).
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "torch>=2.1",
            # Parity references: Hugging Face PEFT adapters and scikit-learn metrics.
            "peft>=0.13",
            # transformers 5.24.0 with peft 0.21.2 breaks the references' prefix tuning: PEFT
            # refuses every encoder ("Model does not support past key values") and Llama's
            # generate() with a prefix changes its first tokens. Lift once a release fixes it.
            "transformers>=4.45,<5.24",
            "scikit-learn>=1.3",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
        ],
    },
)
