"""Do the small-data strategies help? Augmentation and active learning on the catalog data.

  nice -n 10 python bench/small_data.py --stages select,augment,active --steps 60 --k 40 --with-base \
      --out artifacts/small_data.json

Stages (each appends its figures to --out as soon as it ends, so a long run can be read midway):
  select   uncertainty of the k records llm.select_informative picks from the training pool
           (outputs hidden) against k random picks
  augment  accuracy on the paraphrased test questions after training on the original set and on
           the augmented set (--methods), the same number of optimizer steps (--steps) for both
  active   accuracy after training on the k most uncertain records (labels restored from the pool,
           standing in for the person) against k random records, same steps
Accuracy: the expected fact appears in the model's greedy answer (catalog_test.jsonl: questions
worded unlike any training record). Everything runs on the default model through the Engine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_module.engine import Engine  # noqa: E402
from llm_module.settings import Settings  # noqa: E402

DATA = Path("/work/shared/data")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--stages", default="select,augment,active")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of every training run")
    parser.add_argument("--k", type=int, default=40, help="records picked by selection / at random")
    parser.add_argument("--methods", default="synonym", help="augmentation methods, comma-separated")
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=1, help="random-pick baselines and training seeds to average")
    parser.add_argument("--strategy", default="entropy", choices=("entropy", "perplexity"))
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length for scoring and accuracy")
    parser.add_argument("--test-limit", type=int, default=0, help="use only the first N test questions (0: all)")
    parser.add_argument("--with-base", action="store_true", help="also score the untrained model's accuracy")
    parser.add_argument("--out", type=Path, default=Path("artifacts/small_data.json"))
    return parser.parse_args()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="small-data-"))
        # A private home (remembered setup, jobs) and the shared model cache.
        self.engine = Engine(Settings(home=self.work / "home", cache=Settings().models_dir))
        self.engine.setup()
        self.pool = json.loads((args.data_dir / "catalog_train.json").read_text())
        tests = [json.loads(line) for line in (args.data_dir / "catalog_test.jsonl").read_text().splitlines() if line]
        self.tests = tests[:args.test_limit] if args.test_limit else tests
        self.results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "stages": {}}

    def save(self, stage: str, figures: dict) -> None:
        self.results["stages"][stage] = figures
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.results, indent=1))
        print(json.dumps({stage: figures}, indent=1), flush=True)

    def write(self, name: str, records: list[dict]) -> Path:
        path = self.work / name
        path.write_text(json.dumps(records, indent=1))
        return path

    # ------------------------------------------------------------ helpers
    def accuracy(self, adapter: str | None) -> float:
        questions = [t["question"] for t in self.tests]
        answers = self.engine.generate(questions, chat=True, adapter=adapter or "base", do_sample=False,
                                       max_new_tokens=self.args.max_new_tokens)
        hits = [t["expected"].lower() in a[0]["generated_text"].lower() for t, a in zip(self.tests, answers,
                                                                                          strict=True)]
        return round(sum(hits) / len(hits), 4)

    def train_and_score(self, data_file: Path, name: str, seed: int) -> dict:
        start = time.perf_counter()
        trained = self.engine.train(str(data_file), str(self.work / "runs" / name), adapter_name=name, seed=seed,
                                    training_args_kwargs={"max_steps": self.args.steps}, show_progress=False)
        accuracy = self.accuracy(name)
        self.engine.unload_adapter(name)
        return {"records": len(json.loads(data_file.read_text())), "steps": trained["steps"],
                "train_loss": trained["train_loss"], "accuracy": accuracy,
                "seconds": round(time.perf_counter() - start, 1)}

    def unlabelled_pool(self) -> Path:
        return self.write("pool.json", [{"instruction": r["instruction"], "input": r["input"]} for r in self.pool])

    # ------------------------------------------------------------- stages
    def stage_select(self) -> None:
        picked = self.engine.select_informative(str(self.unlabelled_pool()), len(self.pool),
                                                strategy=self.args.strategy,
                                                max_new_tokens=self.args.max_new_tokens, batch_size=16)
        scores = {item["index"]: item["score"] for item in picked["selected"]}
        self.scores = scores
        top = sorted(scores, key=lambda i: -scores[i])[:self.args.k]
        random_means = [statistics.mean(scores[i] for i in random.Random(s).sample(sorted(scores), self.args.k))
                        for s in range(200)]
        self.save("select", {
            "strategy": self.args.strategy, "pool": len(scores), "k": self.args.k,
            "mean_uncertainty_top_k": round(statistics.mean(scores[i] for i in top), 4),
            "mean_uncertainty_random_k": round(statistics.mean(random_means), 4),
            "random_k_95th_percentile": round(sorted(random_means)[189], 4),
            "mean_uncertainty_pool": round(statistics.mean(scores.values()), 4),
            "top_k_fact_kinds": _kinds([self.pool[i] for i in top]),
            "seconds": picked["seconds"],
        })

    def stage_augment(self) -> None:
        original = self.write("original.json", self.pool)
        grown = self.engine.augment(str(original), str(self.work / "augmented.json"),
                                    methods=self.args.methods.split(","), copies=self.args.copies, seed=0)
        runs = {"base_model": {"accuracy": self.accuracy(None)}} if self.args.with_base else {}
        for seed in range(self.args.seeds):
            runs[f"original_seed{seed}"] = self.train_and_score(original, f"orig{seed}", seed)
            runs[f"augmented_seed{seed}"] = self.train_and_score(Path(grown["output_file"]), f"aug{seed}", seed)
        self.save("augment", {"augmentation": grown["methods"], "runs": runs,
                              **_means(runs, ("original", "augmented"))})

    def stage_active(self) -> None:
        if not hasattr(self, "scores"):
            self.stage_select()
        top = sorted(self.scores, key=lambda i: -self.scores[i])[:self.args.k]
        runs = {}
        for seed in range(self.args.seeds):
            chosen = self.write(f"top{seed}.json", [self.pool[i] for i in top])
            runs[f"top_k_seed{seed}"] = self.train_and_score(chosen, f"top{seed}", seed)
            picks = random.Random(1000 + seed).sample(range(len(self.pool)), self.args.k)
            randoms = self.write(f"random{seed}.json", [self.pool[i] for i in picks])
            runs[f"random_k_seed{seed}"] = self.train_and_score(randoms, f"rand{seed}", seed)
            runs[f"random_k_seed{seed}"]["fact_kinds"] = _kinds([self.pool[i] for i in picks])
        self.save("active", {"k": self.args.k, "runs": runs, **_means(runs, ("top_k", "random_k"))})


def _kinds(records: list[dict]) -> dict:
    """How many picked records ask about each kind of fact (price, color, ...)."""
    words = {"price": ("cost", "price"), "color": ("color", "colour"), "material": ("made", "material"),
             "year": ("year", "when was", "introduced", "released", "launched"), "warranty": ("warranty",)}
    counts = dict.fromkeys(words, 0)
    for record in records:
        text = (record["instruction"] + " " + record["input"]).lower()
        for kind, cues in words.items():
            if any(cue in text for cue in cues):
                counts[kind] += 1
                break
    return counts


def _means(runs: dict, groups: tuple[str, ...]) -> dict:
    return {f"mean_accuracy_{g}": round(statistics.mean(r["accuracy"] for n, r in runs.items() if n.startswith(g)), 4)
            for g in groups}


def main() -> None:
    args = parse_args()
    bench = Bench(args)
    for stage in args.stages.split(","):
        getattr(bench, f"stage_{stage.strip()}")()
    print(f"figures in {args.out}")


if __name__ == "__main__":
    main()
