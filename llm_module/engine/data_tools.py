"""The small-data strategies behind llm.augment and llm.select_informative, for the engine.

Both read a data file (confined to the data root) and use the served model through the serving
core: augmentation to paraphrase prompts, active learning to score the model's own answers.
"""

from __future__ import annotations

from typing import Any


class DataTools:
    def __init__(self, settings, serving, confine) -> None:
        """``serving``: the serving core; ``confine(path, what, must_exist)``: a caller's path, checked."""
        self.settings = settings
        self.serving = serving
        self.confine = confine

    def augment(self, data_file: str, output_file: str, methods: list[str] | None = None, copies: int = 1,
                seed: int = 0, *, adapter: str | None = None, **kwargs: Any) -> dict:
        """Write ``data_file``'s records plus augmented copies to ``output_file`` (see data/augment.py)."""
        from ..data.augment import augment_file

        data_path = self.confine(data_file, "data_file", must_exist=True)
        out_path = self.confine(output_file, "output_file", must_exist=False)
        if adapter not in (None, ""):
            self.serving.adapters.resolve(adapter)  # an unknown adapter fails here, before any record is read

        def paraphrase(prompts: list[str], **options: Any) -> list:
            return self.serving.generate(prompts, chat=True, adapter=adapter, **options)

        return augment_file(data_path, out_path, methods=methods or ["synonym"], copies=copies, seed=seed,
                            generate=paraphrase, cache_dir=self.settings.models_dir, **kwargs)

    def select_informative(self, data_file: str, k: int, strategy: str = "entropy", *, adapter: str | None = None,
                           output_file: str | None = None, **kwargs: Any) -> dict:
        """The ``k`` records of ``data_file`` the model is least sure of (see data/active.py)."""
        from ..data.active import select_informative

        data_path = self.confine(data_file, "data_file", must_exist=True)
        out_path = self.confine(output_file, "output_file", must_exist=False) if output_file else None
        name = self.serving.adapters.resolve(adapter)

        def score(prompts: list[str], max_new_tokens: int) -> list:
            call = self.serving.build(prompts, adapter=name or "base", do_sample=False,
                                      max_new_tokens=max_new_tokens, logprobs=True, entropy=True)
            return self.serving.outputs(call)

        return select_informative(score, self.serving.host.tokenizer, data_path, k, strategy=strategy,
                                  adapter=name, output_path=out_path, **kwargs)
