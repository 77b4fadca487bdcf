"""The ``attnfuse`` command: ``explain`` a model's attention sites, ``bench`` the kernels.

``attnfuse explain MODULE:FACTORY`` imports MODULE (a dotted module name or a ``.py`` path),
calls FACTORY() for ``(model, example_inputs)``, and prints :func:`attnfuse.explain`'s report.
``attnfuse bench ARGS...`` runs the repository's ``benchmarks/bench_kernels.py`` with ARGS.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

EXPLAIN_HELP = """\
Capture a model with torch.compile, find every attention site (softmax(Q·Kᵀ)·V, SDPA calls,
nn.MultiheadAttention), and print one row per site: where it is, its shape, mask and the kernel
chosen (or why it was kept). The rest of the graph runs eagerly; the model runs once, no grad.

SPEC is MODULE:FACTORY, where MODULE is an importable module (mypkg.models) or a path to a .py
file (examples/foo.py), and FACTORY a function of no arguments returning (model, example_inputs):
model a torch.nn.Module, example_inputs a tensor, a tuple of positional arguments or a dict of
keyword arguments.

example:  attnfuse explain examples/foo.py:make --html report.html --json report.json
"""

BENCH_HELP = """\
Check, then time, attnfuse's flash kernel against PyTorch's attention kernels on the CUDA GPU,
by running benchmarks/bench_kernels.py from the source checkout; every ARG is passed to it
(`attnfuse bench --help` prints its own options). Needs a CUDA GPU, except for --table.

example:  attnfuse bench --parts speed --d 128 --causal no --out r.json
"""


class CliError(Exception):
    """A usage error: printed as one line to stderr, exit code 2, no traceback."""


def _parser() -> argparse.ArgumentParser:
    from .backend import POLICIES
    from .kernels import registry

    parser = argparse.ArgumentParser(
        prog="attnfuse", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="attnfuse: find attention in a PyTorch model, fuse it, pick a kernel per site.",
        epilog="examples:\n"
               "  attnfuse explain mypkg.models:make             # print every site and decision\n"
               "  attnfuse explain examples/foo.py:make --html r.html --json r.json\n"
               "  attnfuse bench --parts check --out r.json      # ARGS go to bench_kernels.py\n"
               "  attnfuse bench --help                          # bench_kernels.py's options\n\n"
               "`attnfuse explain --help` details SPEC; `python -m attnfuse` is the same command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ex = sub.add_parser("explain", help="import MODULE:FACTORY's (model, inputs), report every "
                        "attention site and the kernel chosen for it (CPU or GPU)",
                        description=EXPLAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("spec", metavar="SPEC", help="MODULE:FACTORY (see above)")
    ex.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report")
    ex.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    ex.add_argument("--policy", default="exact", choices=POLICIES,
                    help="which kernels may run a site (default: exact)")
    ex.add_argument("--kernel", default=None, choices=registry.kernel_names(),
                    help="force one kernel on every site it supports (default: choose)")
    sdpa = ex.add_mutually_exclusive_group()
    sdpa.add_argument("--keep-sdpa", dest="keep_sdpa", action="store_true", default=True,
                      help="leave existing SDPA calls on PyTorch's backends (default)")
    sdpa.add_argument("--replace-sdpa", dest="keep_sdpa", action="store_false",
                      help="route existing SDPA calls through attnfuse's kernel choice too")
    bench = sub.add_parser("bench", help="check and time attnfuse's kernels against PyTorch's by "
                           "running benchmarks/bench_kernels.py ARGS (CUDA GPU, source checkout)",
                           description=BENCH_HELP, add_help=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                       help="arguments for benchmarks/bench_kernels.py")
    return parser


def _import(module: str) -> Any:
    """The module named by a dotted name or a ``.py`` path, as ``python`` would find it."""
    path = Path(module)
    if module.endswith(".py") or os.sep in module or "/" in module:
        if not path.is_file():
            raise CliError(f"no such file: {module}")
        name = "_attnfuse_cli_" + "".join(c if c.isalnum() else "_" for c in path.stem)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CliError(f"cannot load {module} as a Python module")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses and pickling look the module up by name
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # sibling imports work, as in `python FILE`
        try:
            spec.loader.exec_module(mod)
        except ImportError as e:
            del sys.modules[name]
            raise CliError(f"cannot import {module}: {e}") from None
        return mod
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the console script lacks `python -m`'s cwd entry
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CliError(f"cannot import module {module!r}: {e}") from None


def _describe(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        inner = ", ".join(_describe(v) for v in x[:4]) + (", ..." if len(x) > 4 else "")
        return f"{type(x).__name__} of {len(x)} ({inner})"
    return type(x).__name__


def load_factory(spec: str) -> Callable[[], Any]:
    """``"pkg.mod:make"`` or ``"path/to/file.py:make"`` -> the zero-argument function ``make``."""
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise CliError(f"expected MODULE:FACTORY (e.g. mypkg.models:make or examples/foo.py:make), "
                       f"got {spec!r}")
    obj = _import(module)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{module} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{spec} is a {type(obj).__name__}, expected a function returning "
                       f"(model, example_inputs)")
    try:
        inspect.signature(obj).bind()
    except TypeError:
        raise CliError(f"{spec} must take no arguments; its signature is "
                       f"{inspect.signature(obj)}") from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    return obj


def load_model(spec: str) -> tuple[Any, Any]:
    """Call the factory named by ``spec`` and check it returned ``(model, example_inputs)``."""
    import torch

    got = load_factory(spec)()
    ok = (isinstance(got, (tuple, list)) and len(got) == 2 and isinstance(got[0], torch.nn.Module)
          and isinstance(got[1], (torch.Tensor, tuple, list, dict)))
    if not ok:
        raise CliError(f"{spec} must return (model, example_inputs): a torch.nn.Module and a "
                       f"tensor, tuple or dict of inputs; got {_describe(got)}")
    return got[0], got[1]


def _explain(args: argparse.Namespace) -> int:
    from .backend import explain

    model, inputs = load_model(args.spec)
    report = explain(model, inputs, policy=args.policy, kernel=args.kernel,
                     keep_sdpa=args.keep_sdpa)
    print(report)
    if args.html:
        print(f"wrote {report.to_html(args.html)}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _out_arg(argv: Sequence[str]) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out="):
            return a[len("--out="):]
    return None


def _bench(argv: list[str]) -> int:
    import runpy

    import torch

    import attnfuse

    root = Path(attnfuse.__file__).resolve().parents[1]
    script = root / "benchmarks" / "bench_kernels.py"
    if not script.is_file():
        raise CliError(f"`attnfuse bench` needs the source checkout (benchmarks/bench_kernels.py "
                       f"next to the attnfuse package); not found at {script}")
    no_gpu_ok = any(a in ("-h", "--help", "--table") for a in argv)  # help and tables need no GPU
    if not no_gpu_ok and not torch.cuda.is_available():
        raise CliError("`attnfuse bench` needs a CUDA GPU (torch.cuda.is_available() is False); "
                       "`attnfuse bench --table r.json` prints tables from saved results")
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # the script's own exits: argparse errors, --help, failed checks
        if e.code not in (None, 0):
            if not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
            return e.code if isinstance(e.code, int) else 1
        if any(a in ("-h", "--help") for a in argv):
            return 0
    finally:
        sys.argv = saved
    out = _out_arg(argv)
    if out:  # the table is printed by the script; the plots need matplotlib
        plot = root / "benchmarks" / "plot.py"
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"plots: pip install matplotlib, then python {plot} {out}")
            return 0
        if not plot.is_file():
            print(f"plots: python {plot} {out}")
            return 0
        sys.argv = [str(plot), out]
        try:
            runpy.run_path(str(plot), run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                print(f"plotting failed ({e.code}); retry: python {plot} {out}", file=sys.stderr)
        finally:
            sys.argv = saved
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``attnfuse`` and ``python -m attnfuse``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:  # forwarded verbatim: bench_kernels.py parses its own options
            return _bench(argv[1:])
        parser = _parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error (2, already printed): a return code
            return e.code if isinstance(e.code, int) else 2
        if args.command == "explain":
            return _explain(args)
        parser.print_help()
        return 2
    except CliError as e:
        print(f"attnfuse: error: {e}", file=sys.stderr)
        return 2
