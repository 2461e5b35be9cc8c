"""``python -m llm_module ...``: the same as the ``llm-module`` command."""

from llm_module.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
