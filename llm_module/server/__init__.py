"""The HTTP service over one Engine: jaseci's remote-action protocol, a plain /v1 API, the
OpenAI-compatible API, and the playground.

``llm-module serve`` runs it; ``create_app(settings, engine=None)`` builds it for tests and embedding.
"""

from llm_module.server.app import create_app
from llm_module.settings import Settings

__all__ = ["Settings", "create_app"]
