"""demo.sh clears OUT only when it wrote it (its marker file) or OUT is an empty folder; anything else is refused
before any work. `python` is replaced on PATH by a stub that records its arguments and fails, so no test here runs
the 15-minute demo: the stub stops demo.sh at its first python command (tools/world.py)."""
import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo(tmp_path, out):
    """(exit code, stderr, the python commands demo.sh ran) of `bash demo.sh OUT` with the stub python."""
    bin_dir, log = tmp_path / "bin", tmp_path / "python_calls"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "python"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexit 3\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    p = subprocess.run(["bash", os.path.join(ROOT, "demo.sh"), str(out)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return p.returncode, p.stderr, calls


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    """e7b8d93's demo.sh began with rm -rf "$OUT": the user's folder and its file were deleted."""
    user = tmp_path / "my_work"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    rc, err, calls = demo(tmp_path, user)
    assert rc == 1 and calls == [], (rc, err, calls)  # refused before tools/world.py or anything else ran
    assert err.strip().splitlines() == [f"demo.sh: {user} exists and was not written by demo.sh (no "
                                        f"{user}/.written-by-demo.sh); give another OUT or move it away"]
    assert os.listdir(user) == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    rc, err, calls = demo(tmp_path, a_file)  # OUT is a file: refused too, the file kept
    assert rc == 1 and calls == [] and a_file.read_text() == "mine" and "not written by demo.sh" in err


def test_demo_clears_its_own_folder_and_marks_a_new_one(tmp_path):
    """A second run over demo.sh's own OUT (as `bash demo.sh` twice in a row) clears it; so does an empty folder."""
    out = tmp_path / "demo"
    rc, err, calls = demo(tmp_path, out)  # fresh: created and marked, then tools/world.py (the stub fails it)
    assert rc == 3 and calls == [f"tools/world.py {out} 600 100"], (rc, err, calls)
    assert os.listdir(out) == [".written-by-demo.sh"]
    (out / "train_textual.log").write_text("old run")
    rc, err, calls = demo(tmp_path, out)
    assert rc == 3 and calls == [f"tools/world.py {out} 600 100"] and os.listdir(out) == [".written-by-demo.sh"], err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err, calls = demo(tmp_path, empty)
    assert rc == 3 and calls == [f"tools/world.py {empty} 600 100"] and os.listdir(empty) == [".written-by-demo.sh"], err
