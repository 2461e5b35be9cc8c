"""``llm-module``: serve the HTTP service, or run one engine call and print its JSON.

    llm-module serve --port 8000 --token "$TOKEN" --data-root /data
    llm-module generate "Tell me a joke" --max-new-tokens 32
    llm-module train data.jsonl runs/my-adapter
    llm-module evaluate data.jsonl --adapter my-adapter
    llm-module export runs/my-adapter exported/ --format gguf --quantization f16,q8_0
    llm-module adapters
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from llm_module.errors import LLMError


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """``serve``'s flags, one per field of Settings (so they never drift from it)."""
    from llm_module.settings import Settings

    p = sub.add_parser("serve", help="run the HTTP service (jaseci remote actions + /v1 API + OpenAI API)",
                       description="Every flag also reads LLM_MODULE_<NAME> from the environment; flags win.")
    for name, field in Settings.__fields__.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.field_info.description
        if name == "adapters":
            p.add_argument("--adapter", dest="adapters", action="append", type=_name_path, metavar="NAME=PATH",
                           help="adapter to load at start (repeatable)")
        elif field.outer_type_ is bool:  # --x and --no-x; help shows the one that changes the default
            on = field.default is not True
            p.add_argument(flag, dest=name, action="store_true", default=None,
                           help=help_text if on else argparse.SUPPRESS)
            p.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                           help=argparse.SUPPRESS if on else f"turn off: {help_text}")
        else:
            kind = field.outer_type_ if field.outer_type_ in (int, float) else str
            p.add_argument(flag, dest=name, type=kind, help=help_text)
    p.set_defaults(run=_serve)


def _add_engine_commands(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="base model (default: the last setup, else the bundled model)")
    common.add_argument("--adapter-dir", dest="adapter_dirs", action="append", type=_name_path, default=[],
                        metavar="NAME=PATH", help="adapter to load first (repeatable)")
    common.add_argument("--data-root")

    p = sub.add_parser("generate", parents=[common], help="generate text for a prompt")
    p.add_argument("prompt")
    p.add_argument("--adapter", help="adapter to use (name)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--options", type=_json_object, default={}, help="more generation options as JSON")
    p.set_defaults(run=_generate)

    p = sub.add_parser("train", parents=[common], help="LoRA-train an adapter")
    p.add_argument("data_file")
    p.add_argument("output_dir")
    p.add_argument("--params", type=_json_object, default=None, help="training_params as JSON")
    p.add_argument("--num-processes", type=int, help="train as a torchrun job of N processes (DDP); default 1")
    p.add_argument("--nnodes", type=int, help="multi-node: number of nodes (see docs/scaling.md)")
    p.add_argument("--node-rank", type=int, help="multi-node: this node's rank (0: the master)")
    p.add_argument("--master-addr", help="multi-node: address of node 0")
    p.add_argument("--master-port", type=int, help="multi-node: free port on node 0")
    p.set_defaults(run=_train)

    p = sub.add_parser("evaluate", parents=[common], help="loss and perplexity on a data file")
    p.add_argument("data_file")
    p.add_argument("--adapter")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("export", parents=[common], help="merge an adapter and write it as hf / gguf / lora-gguf")
    p.add_argument("adapter", help="a loaded adapter's name or an adapter folder (a llm.train output_dir works)")
    p.add_argument("output_dir")
    p.add_argument("--format", default="gguf", help="hf, gguf (with an Ollama Modelfile) or lora-gguf; default gguf")
    p.add_argument("--quantization", help="comma-separated GGUF types: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1")
    p.add_argument("--name", help="file name stem of the GGUF files (default: the adapter's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an output_dir that holds other files")
    p.set_defaults(run=_export)

    p = sub.add_parser("adapters", help="the adapters the next setup restores (no model is loaded)")
    p.set_defaults(run=_adapters)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-module", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_engine_commands(sub)
    return parser


def settings_from_args(args: argparse.Namespace):
    """Settings from the flags that were given; the rest come from the environment or defaults."""
    from llm_module.settings import Settings

    given = {k: v for k, v in vars(args).items() if k in Settings.__fields__ and v is not None}
    adapters = dict(given.pop("adapters", ()))
    settings = Settings(**given)
    if adapters:  # set after: BaseSettings would merge a dict with LLM_MODULE_ADAPTERS instead of replacing it
        settings.adapters = adapters
    return settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from llm_module.server import create_app

    settings = settings_from_args(args)
    _show_package_logs(settings.log_level)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def _show_package_logs(level: str) -> None:
    """llm_module's own log lines beside uvicorn's (uvicorn configures only its loggers): at start-up,
    the model loaded and which kernel runs its packed layers (runtime/prepare.py)."""
    import logging

    logger = logging.getLogger("llm_module")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def _engine(args: argparse.Namespace):
    from llm_module.engine import Engine
    from llm_module.settings import Settings

    engine = Engine(Settings(**({"data_root": args.data_root} if args.data_root else {})))
    if args.model or args.adapter_dirs:
        engine.setup(args.model, adapters=dict(args.adapter_dirs) or None)
    else:
        engine.ensure_ready()
    return engine


def _generate(args: argparse.Namespace) -> Any:
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "chat": args.chat, **args.options}
    return _engine(args).generate(args.prompt, adapter=args.adapter, **options)


def _train(args: argparse.Namespace) -> Any:
    launch = {key: getattr(args, key) for key in ("num_processes", "nnodes", "node_rank", "master_addr", "master_port")}
    return _engine(args).train(args.data_file, args.output_dir, args.params, **launch)


def _evaluate(args: argparse.Namespace) -> Any:
    return _engine(args).evaluate(args.data_file, args.adapter)


def _export(args: argparse.Namespace) -> Any:
    options: dict[str, Any] = {"overwrite": True} if args.overwrite else {}
    if args.quantization:
        options["quantization"] = [t.strip() for t in args.quantization.split(",") if t.strip()]
    if args.name:
        options["name"] = args.name
    return _engine(args).export(args.adapter, args.output_dir, args.format, **options)


def _adapters(args: argparse.Namespace) -> Any:
    from llm_module.engine.state import StateFile
    from llm_module.settings import Settings

    saved = StateFile(Settings().home / "state.json").read()
    if saved is None:
        return []
    return [{"name": name, "path": path, "default": name == saved.default_adapter}
            for name, path in sorted(saved.adapters.items())]


def main(argv: Sequence[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except ValidationError as exc:  # bad settings: say which, without a traceback
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"llm-module {args.command}: invalid settings: {problems}", file=sys.stderr)
        return 2
    except LLMError as exc:
        print(json.dumps(exc.to_dict(), indent=2), file=sys.stderr)
        return 2 if exc.status < 500 else 1
    if args.command != "serve":
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    return 0
