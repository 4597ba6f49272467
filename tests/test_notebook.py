"""The notebook as Colab runs it: its code cells executed in order, in an empty working
folder, with a stub `google.colab` module (what makes it "Colab"), the way IPython
shows a cell's error (an exception's _render_traceback_ where it has one).

Without CNN_JAX_REPO it stops at its first cell with one line. With CNN_JAX_REPO naming
a local clone of this tree it clones it, installs it (pip, into a virtual environment
of the test's own that sees this one's packages) and runs the experiment (slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "plain_vs_resnet.ipynb"

# Runs the code cells like a kernel would: one namespace; an error ends the run, shown
# as IPython shows it (its _render_traceback_ lines, else a traceback), status 3.
# (Guarded: processes the experiment spawns import this file as their __main__.)
RUNNER = """
import json, sys, traceback
if __name__ == "__main__":
    cells = [c for c in json.load(open(sys.argv[1]))["cells"] if c["cell_type"] == "code"]
    namespace = {"__name__": "__main__"}
    for n, cell in enumerate(cells):
        try:
            exec(compile("".join(cell["source"]), f"<cell {n}>", "exec"), namespace)
        except Exception as e:
            render = getattr(e, "_render_traceback_", None)
            print("\\n".join(render()) if render else traceback.format_exc())
            sys.exit(3)
"""


@pytest.fixture
def colab(tmp_path):
    """An empty working folder, and a `google.colab` module on the path."""
    stub = tmp_path / "stub" / "google" / "colab"   # google: a namespace package, as
    stub.mkdir(parents=True)                          # protobuf's google.protobuf needs
    (stub / "__init__.py").write_text('"""A stand-in for Colab\'s own module."""\n')
    (stub / "output.py").write_text('"""What jax imports when it finds Colab."""\n')
    ipython = tmp_path / "stub" / "IPython"          # the kernel's IPython.display, which
    ipython.mkdir()                                  # jax imports on Colab too
    (ipython / "__init__.py").write_text("version_info = (9, 0, 0)\n")  # matplotlib asks
    (ipython / "display.py").write_text(
        "class Image:\n    def __init__(self, filename):\n        self.shown = filename\n"
        "class Markdown:\n    def __init__(self, text):\n        self.shown = text\n"
        "def display(*objects):\n    for o in objects:\n        print('displayed', o.shown)\n")
    (tmp_path / "runner.py").write_text(RUNNER)
    (tmp_path / "content").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CNN_JAX_REPO", "PYTHONPATH")}
    env.update(PYTHONPATH=str(tmp_path / "stub"), JAX_PLATFORMS="cpu",
               CNN_JAX_CACHE_DIR=str(tmp_path / "cache"))
    return tmp_path, env


def run_notebook(python, tmp: Path, env: dict, timeout: int = 900):
    return subprocess.run([str(python), str(tmp / "runner.py"), str(NOTEBOOK)],
                          cwd=tmp / "content", env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_without_a_repository_the_first_cell_stops_in_one_line(colab):
    tmp, env = colab
    r = run_notebook(sys.executable, tmp, env)
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.strip().splitlines() == [
        "Stopped: set CNN_JAX_REPO to cnn_jax's git URL (in this cell, or "
        "os.environ['CNN_JAX_REPO'] = '...'), then run it again"]
    assert "Traceback" not in r.stdout + r.stderr and "pip" not in r.stdout + r.stderr
    assert list((tmp / "content").iterdir()) == []          # nothing cloned, nothing written


def snapshot_of_this_tree(dest: Path) -> Path:
    """A git repository holding this working tree as it is (tracked and untracked files
    that git does not ignore): what a user's fork would hold."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes((ROOT / name).read_bytes())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(dest)]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run(git + args, check=True)
    return dest


@pytest.mark.slow  # clones, pip-installs the clone (a build), trains the smoke preset: ~2 min
def test_colab_from_an_empty_folder_clones_installs_and_runs(colab):
    tmp, env = colab
    repo = snapshot_of_this_tree(tmp / "origin")
    # a virtual environment of its own that sees this one's packages, so that pip
    # installs the clone there and nothing else (no download of jax and friends)
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True)
    site = next((tmp / "venv" / "lib").glob("python*/site-packages"))
    here = [p for p in sys.path if p.endswith("site-packages")]
    (site / "inherited.pth").write_text("\n".join(here) + "\n")
    env.update(CNN_JAX_REPO=f"file://{repo}", CNN_JAX_PRESET="smoke",
               CNN_JAX_DATA="synthetic:32x32x3:10:64:50", CNN_JAX_OUT="runs/nb")
    r = run_notebook(tmp / "venv" / "bin" / "python", tmp, env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    clone = tmp / "content" / "cnn_jax_repo"
    assert (clone / "pyproject.toml").is_file()
    assert "installing jax's CPU build" in r.stdout          # the accelerator's jax: none here
    assert "backend: cpu" in r.stdout
    results = json.loads((clone / "runs" / "nb" / "results.json").read_text())
    assert results["preset"] == "smoke" and (clone / "runs" / "nb" / "curves.png").exists()
    assert "displayed runs/nb/curves.png" in r.stdout and "| plain | 8 |" in r.stdout
    assert "tensorboard --logdir runs/nb" in r.stdout
    # the clone is what the venv imports now, not this tree
    where = subprocess.run([str(tmp / "venv" / "bin" / "python"), "-c",
                            "import cnn_jax; print(cnn_jax.__file__)"], cwd=tmp,
                           capture_output=True, text=True, env=env)
    assert where.stdout.strip() == str(clone / "cnn_jax" / "__init__.py")
    # running it again (a reconnected runtime): the checkout is found, nothing re-cloned
    again = run_notebook(tmp / "venv" / "bin" / "python", tmp, env)
    assert again.returncode == 0 and "4 nets, 0 to train" in again.stderr


@pytest.mark.slow  # 50 s: outside Colab, from the repository's root, nothing installed
def test_the_notebook_runs_from_the_repository_root(tmp_path):
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(os.environ, JAX_PLATFORMS="cpu", CNN_JAX_PRESET="smoke",
               CNN_JAX_DATA="synthetic:32x32x3:10:64:50", CNN_JAX_OUT=str(tmp_path / "nb"))
    env.pop("CNN_JAX_REPO", None)
    r = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(NOTEBOOK)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "preset: smoke" in r.stdout and (tmp_path / "nb" / "curves.png").exists()
    assert f"tensorboard --logdir {tmp_path / 'nb'}" in r.stdout


def test_the_last_cell_opens_tensorboard_or_says_how(capsys):
    """In IPython it loads TensorBoard's extension and shows OUT's runs; elsewhere
    (no IPython, or no tensorboard installed) it prints the two commands."""
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    last = "".join(cells[-1]["source"])
    exec(compile(last, "<last cell>", "exec"), {"OUT": "runs/x"})
    assert capsys.readouterr().out.strip() == \
        "TensorBoard: pip install tensorboard, then: tensorboard --logdir runs/x"
    magics = []

    class Shell:
        def run_line_magic(self, name, line):
            magics.append((name, line))
    exec(compile(last, "<last cell>", "exec"), {"OUT": "runs/x", "get_ipython": Shell})
    assert magics == [("load_ext", "tensorboard"), ("tensorboard", "--logdir runs/x")]
