"""The ``attnfuse`` command line: explain from a factory, clean errors, bench's GPU check."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attnfuse.cli import main

FACTORY = textwrap.dedent("""
    import torch

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1) @ v

    def make():
        return Attn(), tuple(torch.randn(2, 2, 16, 8) for _ in range(3))

    def make_kwargs():
        q = torch.randn(2, 2, 16, 8)
        return Attn(), {"q": q, "k": q, "v": q}

    def model_only():
        return Attn()

    def needs_arg(n):
        return Attn(), torch.randn(n)

    NOT_CALLABLE = 3
""")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch) -> None:
    """Kernel choices made here must not land in the user's tuning cache."""
    monkeypatch.setenv("ATTNFUSE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    path = tmp_path / "my_factory.py"
    path.write_text(FACTORY)
    return path


def test_explain_writes_html_and_json(factory: Path, tmp_path: Path, capsys) -> None:
    html_out, json_out = tmp_path / "r.html", tmp_path / "r.json"
    code = main(["explain", f"{factory}:make", "--html", str(html_out), "--json", str(json_out)])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 attention site(s)" in out and "-> decision" in out and "1 fused" in out
    assert "my_factory.py:" in out
    assert "attnfuse report" in html_out.read_text(encoding="utf-8")
    sites = json.loads(json_out.read_text())["sites"]
    assert len(sites) == 1 and sites[0]["kernel"] and sites[0]["kernel"] in out


def test_explain_kwargs_and_kernel_option(factory: Path, capsys) -> None:
    assert main(["explain", f"{factory}:make_kwargs", "--kernel", "reference",
                 "--replace-sdpa"]) == 0
    out = capsys.readouterr().out
    assert "attnfuse::reference" in out and "forced" in out


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "expected MODULE:FACTORY"),
    ("{dir}/missing.py:make", "no such file"),
    ("attnfuse_no_such_module_xyz:make", "cannot import module 'attnfuse_no_such_module_xyz'"),
    ("{factory}:nope", "has no attribute 'nope'"),
    ("{factory}:NOT_CALLABLE", "is a int, expected a function"),
    ("{factory}:needs_arg", "must take no arguments"),
    ("{factory}:model_only", "must return (model, example_inputs)"),
])
def test_bad_specs(factory: Path, spec: str, message: str, capsys) -> None:
    spec = spec.format(dir=factory.parent, factory=factory)
    assert main(["explain", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if "model_only" in spec:
        assert "got Attn" in err


def test_bench_needs_gpu(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert main(["bench"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_needs_source_checkout(monkeypatch, tmp_path: Path, capsys) -> None:
    import attnfuse
    monkeypatch.setattr(attnfuse, "__file__", str(tmp_path / "site-packages" / "attnfuse" / "__init__.py"))
    assert main(["bench"]) == 2
    assert "needs the source checkout" in capsys.readouterr().err


def test_no_command_and_bad_option(capsys) -> None:
    assert main([]) == 2
    assert main(["explain", "x:y", "--policy", "nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_python_m_help() -> None:
    r = subprocess.run([sys.executable, "-m", "attnfuse", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "explain" in r.stdout and "bench" in r.stdout


def test_bench_forwards_args_and_plots(monkeypatch, tmp_path: Path, capsys) -> None:
    import attnfuse
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_kernels.py").write_text(
        "import sys\nif __name__ == '__main__':\n    print('ARGS', sys.argv[1:])\n")
    monkeypatch.setattr(attnfuse, "__file__", str(tmp_path / "attnfuse" / "__init__.py"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["bench", "--parts", "check", "--out", "r.json"]) == 0
    out = capsys.readouterr().out
    assert "ARGS ['--parts', 'check', '--out', 'r.json']" in out
    assert f"python {tmp_path / 'benchmarks' / 'plot.py'} r.json" in out   # no plot.py: a hint
    (tmp_path / "benchmarks" / "plot.py").write_text(
        "import sys\nif __name__ == '__main__':\n    print('PLOT', sys.argv[1:])\n")
    pytest.importorskip("matplotlib")
    assert main(["bench", "--out", "r.json"]) == 0
    assert "PLOT ['r.json']" in capsys.readouterr().out
