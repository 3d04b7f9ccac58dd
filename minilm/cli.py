"""The `minilm` command: gradcheck, train, eval, sample, bench.

Every subcommand takes ``--backend numpy|numba|cupy``.
"""
import argparse
import itertools
import os
import signal
import sys

from minilm import backend
from minilm.sample import DEFAULT_PROMPT, DEFAULT_TEMPERATURE, _sample_text


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

    from minilm import config
    p = sub.add_parser("train", help="train a model; every model and optimiser setting is an option")
    p.add_argument("--preset", default=None, choices=list(config.PRESETS),
                   help="the settings to start from (default: shakespeare-char-cpu; with --resume: the saved run's)")
    p.add_argument("--data", default=None,
                   help="'shakespeare' (tiny Shakespeare: $MINILM_DATA_DIR, else downloaded once; the default) "
                        "or a UTF-8 text file; with --resume: the saved run's")
    p.add_argument("--out", default="out", help="folder for checkpoints, metrics.jsonl and loss.png (default: out)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run saved in OUT/last.npz")
    start.add_argument("--overwrite", action="store_true",
                       help="start afresh in an OUT that holds a run, replacing its checkpoints and metrics")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="cupy backend: run every step op by op instead of replaying a GPT's step as a CUDA graph")
    config.add_options(p)
    _add_backend(p)

    p = sub.add_parser("eval", help="validation loss, perplexity and bits per character of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a .npz written by minilm train")
    p.add_argument("--data", default=None, help="the text to evaluate on (default: the checkpoint's training data)")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="the last 10%% of the text (val, the default) or the first 90%% (train)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows scored at once; for a model trained with --batching contiguous, the number of "
                        "streams the split is cut into, which changes the score (1: the whole split in one pass) "
                        "(default: the checkpoint's training batch size)")
    _add_backend(p)

    p = sub.add_parser("sample", help="generate text from a checkpoint, streaming it as it is produced")
    p.add_argument("--checkpoint", required=True, help="a .npz written by minilm train")
    p.add_argument("--prompt", default=None,
                   help="text to continue (characters must be in the model's vocabulary; default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="characters to generate (default: 500)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"divides the logits; 0 = greedy (default: {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely characters; k >= the vocabulary keeps all (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the fewest most likely characters whose probabilities sum to at least p, "
                        "in (0, 1] (default: all)")
    p.add_argument("--seed", type=int, default=None,
                   help="an integer >= 0 for repeatable text (default: a new draw each run)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step (slow; for checks)")
    _add_backend(p)

    from minilm.bench import run as bench_run
    p = sub.add_parser("bench", help="training and sampling speed per backend, side by side with PyTorch")
    bench_run.add_options(p)
    return parser


def _train(args):
    from minilm import config, train
    # a resumed run starts from its own saved settings; options given now override them
    base = train.saved_config(args.out) if args.resume else config.preset(args.preset or "shakespeare-char-cpu")
    cfg = config.from_args(args, base, check=not args.resume)    # a resumed run is checked by train()
    ignored = config.ignored_options(args, cfg)
    if args.resume and args.preset is not None:
        ignored.insert(0, "option '--preset' is ignored with --resume: the saved run's settings are the start")
    if args.no_cuda_graph and backend.current() != "cupy":
        ignored.append("option '--no-cuda-graph' is ignored: it is used only by --backend cupy")
    elif args.no_cuda_graph and (cfg.model != "gpt" or cfg.dtype == "float16"):   # TrainStep's rule
        ignored.append("option '--no-cuda-graph' is ignored: only a GPT's step, in float32 or bfloat16, is "
                       "replayed as a CUDA graph; this run goes op by op anyway")
    for line in ignored:
        print(f"minilm train: warning: {line}", file=sys.stderr)
    data = args.data if args.data is not None or args.resume else "shakespeare"   # None: the saved run's
    result = train.train(cfg, data=data, out_dir=args.out, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.no_progress, cuda_graph=not args.no_cuda_graph)
    if result["interrupted"]:                     # 128 + the signal's number, as a shell reports it
        return 128 + int(signal.Signals[result["interrupted"]])
    return 0


_SAMPLE_OPTIONS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                   "top_p": "--top-p", "seed": "--seed", "use_cache": "--no-cache"}


def _sample(args, out=None):
    out = out or sys.stdout
    pieces = _sample_text(args.checkpoint, args.prompt, args.max_new_tokens, op="minilm sample",
                          what="option '--prompt'", names=_SAMPLE_OPTIONS, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache)
    with backend.compile_notice():                 # the first token compiles the kernels on a cold cache
        first = list(itertools.islice(pieces, 1))
    try:
        out.write(DEFAULT_PROMPT if args.prompt is None else args.prompt)   # after the notice: never splits the text
        for piece in itertools.chain(first, pieces):
            out.write(piece)
            out.flush()
        out.write("\n")
    except UnicodeEncodeError as e:                # a terminal or pipe in an encoding short of the model's text
        encoding = getattr(out, "encoding", None) or e.encoding
        raise ValueError(f"the output's encoding, {encoding}, cannot write {e.object[e.start:e.end]!r}; set "
                         f"PYTHONIOENCODING=utf-8 (or a UTF-8 locale) to print the model's text") from None
    return 0


_MEMORY_HINTS = {
    "train": "; give smaller sizes: --n-layer, --n-embd, --hidden-size, --block-size or --batch-size",
    "eval": "; give a smaller --batch-size",
}


def _silence_stdout():
    """Point stdout at the null device, so that Python's flush at exit finds no closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):           # no file descriptor (a captured stdout)
        pass


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        backend.use(getattr(args, "backend", None) or backend.default_backend())
    except (RuntimeError, ValueError) as e:
        parser.error(str(e))
    try:
        if args.command == "gradcheck":
            from minilm import gradcheck_cli
            return gradcheck_cli.run(args)
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            from minilm import evaluate
            return evaluate.run(args)
        if args.command == "sample":
            return _sample(args)
        if args.command == "bench":
            from minilm.bench import run as bench_run
            bench_run.benchmark(args)
            return 0
    except KeyboardInterrupt:                                # Ctrl-C (train saves at the first one, exit 130)
        lost = "; what it trained since its last checkpoint was not saved" if args.command == "train" else ""
        print(f"\nminilm {args.command}: interrupted{lost}", file=sys.stderr)
        return 130
    except BrokenPipeError:                                  # output into `head`, which has read enough
        _silence_stdout()
        return 141                                           # as a shell reports a process ended by SIGPIPE
    except MemoryError as e:
        hint = _MEMORY_HINTS.get(args.command, "")
        print(f"minilm {args.command}: error: not enough memory ({e}){hint}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError, ArithmeticError) as e:    # a loss that diverged, too
        command = f"minilm {args.command}"
        message = str(e).removeprefix(f"{command}: ")       # the command's own checks name it already
        print(f"{command}: error: {message}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
