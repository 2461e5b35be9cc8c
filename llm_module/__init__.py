"""llm_module: run, fine-tune and serve language models from Jac programs (act group ``llm``)."""

__version__ = "0.2.0"

from llm_module.engine import Engine  # noqa: E402
from llm_module.settings import Settings  # noqa: E402

__all__ = ["Engine", "Settings", "__version__"]
