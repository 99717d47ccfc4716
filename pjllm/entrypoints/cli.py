"""The `pjllm` command line: `pjllm generate`, `pjllm serve`, `pjllm download`, `pjllm bench`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from pjllm.config import EngineConfig


_GENERATE_SKIPS = ("model", "seed")  # `pjllm generate` options of its own with these names


def _add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text for one or more prompts")
    parser.add_argument("--model", default=None,
                        help="HF directory or .gguf file (default: SmolLM2-135M-Instruct, downloaded "
                             "and cached on first use)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="a prompt; repeat for several")
    parser.add_argument("--chat", action="store_true", help="render each prompt as a user message "
                        "with the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--stop", action="append", default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    # --seed is the sampling seed here; the engine's keeps its default.
    add_dataclass_args(parser.add_argument_group("engine"), EngineConfig, skip=_GENERATE_SKIPS)
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine progress")


def _generate(args: argparse.Namespace) -> int:
    from pjllm.entrypoints.llm import LLM
    from pjllm.models.default_model import resolve_default_model
    from pjllm.sampling_params import SamplingParams

    model = args.model or resolve_default_model()
    llm = LLM(model, **dataclass_kwargs(args, EngineConfig, skip=_GENERATE_SKIPS))
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, seed=args.seed, max_tokens=args.max_tokens, stop=args.stop,
                            ignore_eos=args.ignore_eos)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for prompt, output in zip(args.prompt, outputs):
        for completion in output.outputs:
            if len(args.prompt) > 1 or args.n > 1:
                print(f"--- {prompt!r} [{completion.index}] ({completion.finish_reason})")
            print(completion.text)
    return 0


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` option per field of the config dataclass `cls`, so the command line
    and the config never drift. Options left out keep the dataclass's default (the parsed value
    is absent); booleans take --x / --no-x."""
    kinds = {"int": int, "int | None": int, "float": float, "str": str, "str | None": str}
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else "per machine"
        if field.type == "bool":
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"default: {default}")
        else:
            parser.add_argument(flag, dest=field.name, type=kinds[field.type], default=argparse.SUPPRESS,
                                metavar=field.name.upper(), help=f"default: {default}")


def dataclass_kwargs(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict:
    """The options given for `cls`'s fields (see add_dataclass_args)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if hasattr(args, f.name) and f.name not in skip}


def _add_serve_parser(subparsers) -> None:
    from pjllm.entrypoints.openai.server_config import ServerConfig

    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL (an HF directory or .gguf file; default: SmolLM2-135M-Instruct) "
                    "over an OpenAI-compatible API. Server options, then every engine option "
                    "(EngineConfig's fields).")
    parser.add_argument("model", nargs="?", default=None)
    server = parser.add_argument_group("server")
    add_dataclass_args(server, ServerConfig)
    engine = parser.add_argument_group("engine")
    add_dataclass_args(engine, EngineConfig, skip=("model",))
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine progress")


def _serve(args: argparse.Namespace) -> int:
    from pjllm.entrypoints.openai.api_server import serve
    from pjllm.entrypoints.openai.server_config import ServerConfig
    from pjllm.models.default_model import resolve_default_model

    logging.getLogger("pjllm").setLevel(logging.INFO)
    config = ServerConfig(**dataclass_kwargs(args, ServerConfig))
    return serve(args.model or resolve_default_model(), config, dataclass_kwargs(args, EngineConfig, skip=("model",)))


def _download(args: argparse.Namespace) -> int:
    from pjllm.models.default_model import download_model

    print(download_model(args.name, args.cache_dir))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pjllm.models.orbax_checkpoint import convert_to_orbax

    print(convert_to_orbax(args.model, args.out, args.dtype))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pjllm.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    """The `pjllm` argument parser with every subcommand."""
    from pjllm.bench import add_bench_parser

    from pjllm import __version__

    parser = argparse.ArgumentParser(prog="pjllm", description="LLM inference in JAX")
    parser.add_argument("--version", action="version", version=f"pjllm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(subparsers)
    from pjllm.models.default_model import DEFAULT_MODEL, KNOWN_MODELS

    download = subparsers.add_parser("download", help="fetch, verify and cache a known model "
                                     "(default: the default model) and print its path")
    download.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(KNOWN_MODELS))
    download.add_argument("--cache-dir", default=None)
    convert = subparsers.add_parser(
        "convert", help="write a model (HF directory or GGUF file) as a pjllm checkpoint, whose "
                        "weights restore straight onto the devices' shards")
    convert.add_argument("model")
    convert.add_argument("out", help="the directory to write (new or empty)")
    convert.add_argument("--format", default="orbax", choices=["orbax"])
    convert.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16",
                                                              "float32"],
                         help="the weights' dtype (auto: bfloat16)")
    _add_serve_parser(subparsers)
    add_bench_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.cli_argv = argv  # the command a bench result records
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        commands = {"generate": _generate, "download": _download, "serve": _serve, "bench": _bench,
                    "convert": _convert}
        return commands[args.command](args)
    except ValueError as error:
        print(f"pjllm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
