"""omni-smola: soft mixtures of low-rank experts on frozen PaLI-like models (JAX/Flax)."""
import setuptools

setuptools.setup(
    name="omni-smola",
    version="0.1.0",
    description="Omni-SMoLA adapters and trainer for frozen vision-language encoder-decoders.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["omni_smola", "omni_smola.*", "tasks", "tasks.*"]),
    package_data={"": ["*.gin", "*.model"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "seqio>=0.0.19",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.6",
        "tensorflow-text>=2.16",
        "gin-config>=0.5",
        "clu>=0.0.12",
        "tensorboard>=2.16",  # clu's TensorBoard metric writers
        "numpy>=1.26",
        "pycocoevalcap>=1.2",
        "importlib_resources>=6",  # TFDS needs it to prepare datasets on Python 3.11.
        "sentencepiece>=0.2",
        "tensorstore>=0.1.60",
        "safetensors>=0.4",
        "matplotlib>=3.8",
        "pillow>=10",
        "scikit-learn>=1.4",  # ships the handwritten digits of the offline mini mixture
        "scikit-image>=0.22",  # ships the photographs of the offline mini mixture
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            # Parity tests against the reference implementations (CPU torch).
            "torch>=2.3",
            "transformers>=4.44",
            "peft>=0.13",  # LoRA exported in peft's format loads with PeftModel
        ],
    },
    entry_points={
        "console_scripts": [
            "omni-smola-train=omni_smola.train:console_entry_point",
            "omni-smola-eval=omni_smola.eval:console_entry_point",
            "omni-smola-infer=omni_smola.infer:console_entry_point",
            "omni-smola-export=omni_smola.export:console_entry_point",
        ],
    },
)
