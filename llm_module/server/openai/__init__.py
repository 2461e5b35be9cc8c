"""The OpenAI-compatible API of the service (routes.py), translated onto the serving core (translate.py)."""
