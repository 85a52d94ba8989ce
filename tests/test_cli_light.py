"""The light command-line verbs (`--help`, `pq`, `viz`, `data synth`) never import torch.

Importing torch costs seconds on a small machine, more than `unipan pq` needs for a thousand
images; each check runs a fresh interpreter, since this test process has torch loaded already.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs the command in-process and reports, at exit, whether torch was loaded: the last line of
# stdout is TORCH or NO_TORCH, whatever the verb printed (or whether it exited through SystemExit).
_RUN_CLI = """
import atexit, sys
atexit.register(lambda: print("TORCH" if "torch" in sys.modules else "NO_TORCH", flush=True))
from unipan.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _unipan(*args: str | Path) -> tuple[int, str, str]:
    out = subprocess.run([sys.executable, "-c", _RUN_CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout, out.stderr


def _assert_torch_free(code: int, stdout: str, stderr: str) -> None:
    assert code == 0, stderr[-2000:]
    lines = stdout.strip().splitlines()
    assert lines and lines[-1] == "NO_TORCH", f"torch was imported:\n{stdout[-2000:]}"


def test_help_exits_0_without_torch() -> None:
    code, stdout, stderr = _unipan("--help")
    _assert_torch_free(code, stdout, stderr)
    for verb in ("data", "pq", "viz", "train", "eval", "predict", "demo"):
        assert verb in stdout


@pytest.mark.parametrize("verb", ["pq", "viz", "data"])
def test_light_verb_modules_load_no_torch(verb: str) -> None:
    code = (
        "import sys\n"
        "from unipan.cli import build_parser\n"
        f"build_parser({verb!r})\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(loaded[:5]); sys.exit(1 if loaded else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"building the {verb} parser imported torch: {out.stdout}{out.stderr[-2000:]}"


@pytest.mark.parametrize("verb", [["pq", "--help"], ["viz", "--help"], ["data", "synth", "--help"]])
def test_light_verb_help_loads_no_torch(verb: list[str]) -> None:
    _assert_torch_free(*_unipan(*verb))


def test_light_verbs_run_without_torch(tmp_path: Path) -> None:
    """A real `data synth`, `pq` and `viz` on a two-image folder, each in a fresh process."""
    _assert_torch_free(*_unipan("data", "synth", "--n", "2", "--size", "48", "64", "--out", tmp_path / "synth"))
    split = tmp_path / "synth" / "train"
    gt_json = split / "panoptic.json"
    assert gt_json.is_file()

    code, stdout, stderr = _unipan(
        "pq",
        "--gt-json",
        gt_json,
        "--gt-dir",
        split / "panoptic",
        "--pred-json",
        gt_json,
        "--pred-dir",
        split / "panoptic",
        "--json",
        tmp_path / "pq.json",
    )
    _assert_torch_free(code, stdout, stderr)
    assert "100.00" in stdout  # the ground truth against itself

    code, stdout, stderr = _unipan(
        "viz",
        "--images",
        split / "images",
        "--panoptic",
        split / "panoptic",
        "--json",
        gt_json,
        "--out",
        tmp_path / "pictures",
    )
    _assert_torch_free(code, stdout, stderr)
    assert len(list((tmp_path / "pictures").glob("*.png"))) == 2


def test_heavy_verbs_set_the_thread_defaults_before_torch() -> None:
    """`unipan train` puts the OpenMP defaults into the environment before anything imports torch."""
    from unipan.threads import DEFAULT_THREAD_ENV, WAIT_VARIABLES

    code = (
        "import atexit, os, sys\n"
        "atexit.register(lambda: print({k: os.environ.get(k) for k in sorted(DEFAULTS)}, 'torch' in sys.modules))\n"
        "from unipan.threads import DEFAULT_THREAD_ENV as DEFAULTS\n"
        "from unipan.cli import main\n"
        "sys.exit(main(['train', '--help']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (*DEFAULT_THREAD_ENV, *WAIT_VARIABLES)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"{dict(sorted(DEFAULT_THREAD_ENV.items()))} False"


def test_configure_threads_keeps_what_the_user_set() -> None:
    from unipan.threads import DEFAULT_THREAD_ENV, WAIT_VARIABLES, configure_threads

    for variable in WAIT_VARIABLES:  # either wait setting of the user's stands alone
        env = {variable: "1", "PATH": "/bin"}
        assert configure_threads(env) == {}
        assert env == {variable: "1", "PATH": "/bin"}
    env = {"OMP_NUM_THREADS": "2"}
    assert configure_threads(env) == DEFAULT_THREAD_ENV
    assert env == {"OMP_NUM_THREADS": "2", **DEFAULT_THREAD_ENV}
    env = {}
    assert configure_threads(env) == DEFAULT_THREAD_ENV == env


def test_overrides_are_found_anywhere_on_the_line(tmp_path: Path) -> None:
    from unipan.cli import split_overrides

    odd_name = tmp_path / "a.b=c.png"  # a file whose name reads like an override stays a path
    odd_name.write_bytes(b"")
    argv = ["--weights", "w.pth", "imgs", "data.min_size_test=64", "--out", "x.y=z", str(odd_name), "model.a.b=[1,2]"]
    rest, overrides = split_overrides(argv, value_options={"--weights", "--out"})
    assert overrides == ["data.min_size_test=64", "model.a.b=[1,2]"]
    assert rest == ["--weights", "w.pth", "imgs", "--out", "x.y=z", str(odd_name)]  # --out's value kept
    assert split_overrides(["cfg.yaml", "nodot=1", "--resume"], set()) == (["cfg.yaml", "nodot=1", "--resume"], [])


def test_a_light_verb_reports_an_unwritable_output_in_one_line_without_torch(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, stdout, stderr = _unipan("data", "synth", "--n", "1", "--out", tmp_path / "file" / "out")
    assert code == 2 and stdout.strip().splitlines()[-1] == "NO_TORCH"
    out = tmp_path / "file" / "out"
    assert stderr.strip() == f"unipan data synth: error: output folder (--out) {out} cannot be written: not a directory"
