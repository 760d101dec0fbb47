"""The house rules, checked: stages are siblings, one owner per artifact path, and the one error
rule of every main (user errors are one line, bugs keep their traceback)."""
import ast
import errno
import glob
import os
import subprocess
import sys

import pytest

from dwjax import cli
from dwjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "dwjax")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in glob.glob(os.path.join(PACKAGE, "*.py")):
        with open(path) as f:
            out[os.path.basename(path)[:-3]] = ast.parse(f.read(), path)
    return out


def _is_stage(tree: ast.Module) -> bool:
    """A stage is a module run as a program: it has an `if __name__ == "__main__":` block."""
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def _imported_dwjax_modules(tree: ast.Module) -> set[str]:
    """Every dwjax module a module imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dwjax.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "dwjax":
                found |= {a.name for a in node.names}
            elif node.module.startswith("dwjax."):
                found.add(node.module.split(".")[1])
    return found


def test_stages_are_siblings():
    modules = _modules()
    stages = {name for name, tree in modules.items() if _is_stage(tree)}
    assert {"convert", "train", "spectrum", "assign", "report"} <= stages
    offenders = {name: sorted(_imported_dwjax_modules(tree) & (stages - {name}))
                 for name, tree in modules.items()}
    assert {n: s for n, s in offenders.items() if s} == {}


def test_the_import_check_catches_a_stage_importing_a_stage():
    tree = ast.parse("def f():\n    from dwjax.train import train_and_evaluate\n"
                     "import dwjax.report\nfrom dwjax import spectrum as s, paths\n")
    assert _imported_dwjax_modules(tree) == {"train", "report", "spectrum", "paths"}


# Artifact file names and who alone may spell them.
OWNERS = {
    '"config.json"': "workdir", '"labels.json"': "workdir", '"metrics.jsonl"': "workdir",
    '"spectrum.npz"': "workdir", '"kmeans_k': "workdir", '"checkpoints"': "workdir",
    '"manifest.json"': "shards", '"source.json"': "shards", '.npy"': "shards",
    '"settings.json"': "assignments", '"summary.json"': "assignments",
}


def _string_literals(tree: ast.Module) -> list[str]:
    """Every string constant of a module, docstrings left out (they may describe the layout)."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docs]


def test_each_artifact_path_has_one_owner():
    for name, tree in _modules().items():
        strings = _string_literals(tree)
        for literal, owner in OWNERS.items():
            if name != owner:
                bad = [s for s in strings if literal.strip('"') in s
                       and (literal.startswith('"') and s.startswith(literal.strip('"'))
                            or literal.endswith('"') and s.endswith(literal.strip('"')))]
                assert not bad, f"{name}.py spells {literal} (owned by {owner}.py)"


def test_user_errors_become_one_line_and_bugs_propagate(capsys):
    with pytest.raises(SystemExit) as e:
        with cli.user_errors("demo"):
            raise ConfigError("--config.x 3: too\nbig")
    assert e.value.code == 1
    assert capsys.readouterr().err == "demo: --config.x 3: too big\n"
    # Ctrl-C (exit 130, "<stage>: interrupted") is tested on a real run in test_failures.py
    with pytest.raises(SystemExit) as e:
        with cli.user_errors("demo"):
            raise OSError(errno.ENOSPC, "No space left on device", "/data/x.npy")
    assert e.value.code == 1
    assert capsys.readouterr().err == "demo: /data/x.npy: No space left on device\n"
    for bug in (ValueError("internal"), KeyError("k"), OSError(errno.EBADF, "bad fd")):
        with pytest.raises(type(bug)):
            with cli.user_errors("demo"):
                raise bug


_BUGGY_REPORT = """
from absl import app
from dwjax import report
def broken(*args, **kwargs):
    raise ValueError("an internal bug")
report.run_report = broken
report.define_flags()
app.run(report.main)
"""


def test_a_bug_in_a_stage_keeps_its_traceback(tmp_path):
    """A plain ValueError inside a stage is a bug: the main must not turn it into a tidy line."""
    p = subprocess.run([sys.executable, "-c", _BUGGY_REPORT, f"--workdir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 1
    assert "Traceback" in p.stderr and "ValueError: an internal bug" in p.stderr
    # the same stage with a user error: one line, no traceback
    p = subprocess.run([sys.executable, "-m", "dwjax.report", f"--workdir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("report: ")
