"""The `minilm` command: gradcheck, train, eval, sample, bench.

gradcheck, train, eval and sample take ``--backend numpy|numba|cupy``; bench measures the backends
its ``--backends`` names. Exit codes: 0 done; 1 a gradient check failed; 2 an error (a usage error
or one found at run time), said in one line on stderr; 130 and 143 interrupted (Ctrl-C, SIGTERM),
train having saved first; 141 the output's reader closed the pipe.
"""
import argparse
import difflib
import importlib.metadata
import itertools
import os
import signal
import sys
import warnings

from minilm import backend
from minilm.sample import DEFAULT_PROMPT, DEFAULT_TEMPERATURE, _sample_text


def _add_backend(p, resumes=False):
    saved = "with --resume: the saved run's (where it can start), else " if resumes else ""
    p.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="numpy (reference), numba (JIT CPU kernels) or cupy (GPU); "
                        f"default: $MINILM_BACKEND, else {saved}numba when it imports, else numpy")


def build_parser():
    parser = argparse.ArgumentParser(prog="minilm", description="Small language models, every layer by hand.")
    parser.add_argument("--version", action="version", version=f"minilm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.subcommands = sub.choices

    def add_parser(name, what):                     # what it does, in `minilm --help` and its own --help
        return sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")

    from minilm.opcases import CASES
    p = add_parser("gradcheck", "check every op's backward against numerical gradients")
    p.add_argument("--op", action="append", choices=list(CASES), metavar="NAME",
                   help=f"check only this op (repeatable); one of: {', '.join(CASES)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the example inputs (default: 0)")
    _add_backend(p)

    from minilm import config
    p = add_parser("train", "train a model; every model and optimiser setting is an option")
    p.add_argument("--preset", default=None, choices=list(config.PRESETS),
                   help=f"the settings to start from (default: {config.DEFAULT_PRESET}; with --resume: the saved "
                        f"run's)")
    p.add_argument("--data", default=None,
                   help="'shakespeare' (tiny Shakespeare: $MINILM_DATA_DIR, else downloaded once; the default) "
                        "or a UTF-8 text file; with --resume: the saved run's")
    p.add_argument("--out", default="out", help="folder for checkpoints, metrics.jsonl and loss.png (default: out)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run saved in OUT/last.npz")
    start.add_argument("--overwrite", action="store_true",
                       help="start afresh in an OUT that holds a run, replacing its checkpoints and metrics")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway where stderr is not a terminal)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="cupy backend: run every step op by op instead of replaying a GPT's step as a CUDA graph")
    config.add_options(p)
    _add_backend(p, resumes=True)

    p = add_parser("eval", "validation loss, perplexity and bits per character of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a .npz written by minilm train")
    p.add_argument("--data", default=None, help="the text to evaluate on (default: the checkpoint's training data)")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="the last 10%% of the text (val, the default) or the first 90%% (train)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows scored at once; for a model trained with --batching contiguous, the number of "
                        "streams the split is cut into, which changes the score (1: the whole split in one pass) "
                        "(default: the checkpoint's training batch size)")
    _add_backend(p)

    p = add_parser("sample", "generate text from a checkpoint, streaming it as it is produced")
    p.add_argument("--checkpoint", required=True, help="a .npz written by minilm train")
    p.add_argument("--prompt", default=None,
                   help="text to continue (characters must be in the model's vocabulary; default: a newline); "
                        "one that starts with '-' is given as --prompt=-TEXT")
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
    p = add_parser("bench", "training and sampling speed per backend, side by side with PyTorch")
    bench_run.add_options(p)
    return parser


def _train(args):
    from minilm import config, train
    # a resumed run starts from its own saved settings, backend included; options given now override them
    if args.resume and args.backend is None and not os.environ.get("MINILM_BACKEND"):
        saved_backend = train.saved_backend(args.out)
        if saved_backend is not None:
            try:
                backend.use(saved_backend)
            except (ImportError, RuntimeError, ValueError) as e:     # cupy saved, no GPU here: the default, noted
                print(f"note: the run was saved on the {saved_backend} backend, which cannot start here ({e})")
    base = train.saved_config(args.out) if args.resume else config.preset(args.preset or config.DEFAULT_PRESET)
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
                         progress=not args.no_progress and _is_terminal(sys.stderr), cuda_graph=not args.no_cuda_graph)
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


def _is_terminal(stream):
    """A log file or a pipe gets no progress bar: its redraws would pile up on one line."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):                    # no such method, or a closed stream
        return False


def _version():
    try:
        return importlib.metadata.version("minilm")
    except importlib.metadata.PackageNotFoundError:          # run from a checkout that was never installed
        return "(not installed)"


class _OutputError(OSError):
    """The command's output (stdout) could not be written: said so, where a bare '[Errno 28] No space
    left on device' read like the disk that holds the checkpoints."""


class _Output:
    """sys.stdout while a command runs. A write or flush that fails (a full disk, an I/O error) raises
    _OutputError; a closed pipe stays BrokenPipeError (exit 141). With ``escape`` (every command but
    sample, whose output is a log, not the model's text), a character the output's encoding lacks,
    such as a file name's in an ASCII locale, is written as a backslash escape, as Python writes stderr."""

    def __init__(self, stream, escape):
        self._stream, self._escape = stream, escape

    def __getattr__(self, name):                            # encoding, isatty, fileno: the stream's own
        return getattr(self._stream, name)

    def write(self, text):
        try:
            return self._stream.write(text)
        except UnicodeEncodeError as e:
            if not self._escape:
                raise
            encoding = getattr(self._stream, "encoding", None) or e.encoding
            return self._stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        except BrokenPipeError:
            raise
        except OSError as e:
            raise _OutputError(f"could not write the output (stdout): {e.strerror or e}") from None

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise _OutputError(f"could not write the output (stdout): {e.strerror or e}") from None


def _silence_stdout():
    """Point stdout at the null device, so that Python's flush at exit finds no closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):           # no file descriptor (a captured stdout)
        pass


def _parse(parser, argv):
    """parse_args, but an unknown option is reported by its subcommand, with the nearest option."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extras = parser.parse_known_args(argv)
    if extras and argv.index(args.command) > argv.index(extras[0]):     # `minilm --bogus train`: minilm's own
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if extras:
        sub = parser.subcommands[args.command]
        near = difflib.get_close_matches(extras[0].split("=")[0], list(sub._option_string_actions), n=1,
                                          cutoff=0.75)
        sub.error(f"unrecognized arguments: {' '.join(extras)}" + (f" (did you mean {near[0]}?)" if near else ""))
    for name in ("out", "checkpoint", "data", "json"):       # '--out=~/x': the shell leaves '~' to us
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    return args


def _one_line(message):
    """``message`` with its control characters (a file name's newline or terminal escape, a right-to-left
    override) written as escapes, so that an error or a warning stays one line and cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _warning_of(command):
    """A warning as the command's own are said, without Python's file, line and source."""
    def format_warning(message, *_):
        return f"{command}: warning: {_one_line(str(message).removeprefix(f'{command}: '))}\n"
    return format_warning


def _run(args):
    # a backend that cannot start here is one line below, not under the command's usage; bench
    # starts each backend it measures itself: $MINILM_BACKEND is not one of them
    backend.use("numpy" if args.command == "bench" else getattr(args, "backend", None) or backend.default_backend())
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
    from minilm.bench import run as bench_run
    bench_run.benchmark(args)
    return 0


def main(argv=None):
    parser = build_parser()
    args = _parse(parser, argv)
    python_format, warnings.formatwarning = warnings.formatwarning, _warning_of(f"minilm {args.command}")
    streams = sys.stdout, sys.stderr
    # a closed stderr (2>&-) is None, and print(file=None) writes to stdout: the notes and errors would
    # land in the output (the model's text); they go nowhere instead, the exit code still says what happened
    sys.stderr = sys.stderr or open(os.devnull, "w")
    try:
        if sys.stdout is None:                               # >&-: what the command prints would be lost
            raise _OutputError("could not write the output: stdout is closed; redirect it to a file or "
                               "/dev/null instead")
        sys.stdout = _Output(sys.stdout, escape=args.command != "sample")
        code = _run(args)
        sys.stdout.flush()                                   # a full disk shows here, not in Python's exit
        return code
    except _OutputError as e:
        if sys.stdout is not None:
            _silence_stdout()                                # the text that failed is not tried again at exit
        print(f"minilm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                                # Ctrl-C (train saves at the first one, exit 130)
        lost = "; what it trained since its last checkpoint was not saved" if args.command == "train" else ""
        print(f"\nminilm {args.command}: interrupted{lost}", file=sys.stderr)
        return 130
    except BrokenPipeError:                                  # output into `head`, which has read enough
        _silence_stdout()
        return 141                                           # as a shell reports a process ended by SIGPIPE
    except MemoryError as e:
        hint = _MEMORY_HINTS.get(args.command, "")
        why = f" ({e})" if str(e) else ""                   # NumPy says what it could not allocate; Python may not
        print(f"minilm {args.command}: error: not enough memory{why}{hint}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError, ArithmeticError) as e:    # a loss that diverged, too
        command = f"minilm {args.command}"
        message = str(e).removeprefix(f"{command}: ")       # the command's own checks name it already
        print(f"{command}: error: {_one_line(message)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = python_format
        if isinstance(sys.stdout, _Output):                 # after an error too: not left to Python's exit
            try:
                sys.stdout.flush()
            except OSError:                                  # the output failed as well: the error said is the command's
                _silence_stdout()
        if sys.stderr is not streams[1]:
            sys.stderr.close()
        sys.stdout, sys.stderr = streams


def entry():
    """The `minilm` command: ``main()``, then a Ctrl-C during the interpreter's exit (the command done,
    a run's checkpoints saved) ends the process as the signal does, which the shell reports as 130,
    rather than as a KeyboardInterrupt traceback from a finalizer (tqdm's, the thread pools')."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return code


if __name__ == "__main__":
    sys.exit(entry())
