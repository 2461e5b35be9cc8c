"""llm_module: run, fine-tune and serve language models from Jac programs (act group ``llm``)."""

__version__ = "0.1.0"

from llm_module.engine import Engine, default_engine  # noqa: E402

__all__ = ["Engine", "default_engine", "__version__"]
