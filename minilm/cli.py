"""The `minilm` command: gradcheck, train, eval, sample, bench.

Every subcommand takes ``--backend numpy|numba|cupy``.
"""
import argparse
import sys

from minilm import backend


def _add_backend(p):
    p.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="numpy (reference), numba (JIT CPU kernels) or cupy (GPU); "
                        "default: $MINILM_BACKEND, else numba when it imports, else numpy")


def build_parser():
    parser = argparse.ArgumentParser(prog="minilm", description="Small language models, every layer by hand.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from minilm.opcases import CASES
    p = sub.add_parser("gradcheck", help="check every op's backward against numerical gradients")
    p.add_argument("--op", action="append", choices=list(CASES), metavar="NAME",
                   help=f"check only this op (repeatable); one of: {', '.join(CASES)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the example inputs")
    _add_backend(p)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        backend.use(args.backend or backend.default_backend())
    except (RuntimeError, ValueError) as e:
        parser.error(str(e))
    if args.command == "gradcheck":
        from minilm import gradcheck_cli
        return gradcheck_cli.run(args)
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
