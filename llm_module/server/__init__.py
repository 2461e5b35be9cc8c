"""The HTTP service: jaseci's remote-action protocol plus a plain HTTP API over one Engine.

``llm-module serve`` runs it; ``create_app(settings)`` builds it for tests and embedding.
"""

from llm_module.server.app import create_app
from llm_module.server.settings import Settings

__all__ = ["Settings", "create_app"]
