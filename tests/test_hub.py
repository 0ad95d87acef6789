"""Hub ids never hang and never print a traceback: a hub endpoint that accepts connections and never answers, one that
refuses them, offline mode with and without a cached snapshot, and local paths that are never taken for hub ids.
huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME when it is imported, so these run the CLIs (and
load.resolve) as subprocesses with the environment set, which also checks what a user sees."""
import os
import socket
import subprocess
import sys
import threading

import pytest

import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path, **env):
    """(exit code, stdout, stderr lines) of `python args` from the repository root, with a fresh hub cache (HF_HOME)
    and the given environment; 60 s is far above any expected run, so a hang fails here, not forever."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env = {**keep, "HF_HOME": str(tmp_path / "hf_home"), "GUIVLM_HUB_TIMEOUT": "2", "NO_PROXY": "127.0.0.1",
           "no_proxy": "127.0.0.1", **env}  # a proxy or offline setting of this machine must not change the test
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout, [line for line in p.stderr.splitlines() if line.strip()]


@pytest.fixture
def silent_server():
    """An endpoint that accepts every connection and never answers, as some proxies do."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(s.accept()[0])
            except OSError:  # closed at the end of the test
                return
    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    for c in held:
        c.close()
    s.close()


def closed_port():
    """A local port nothing listens on: a connection to it is refused at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_a_silent_hub_fails_within_the_timeout(tmp_path, silent_server):
    """e7b8d93 called snapshot_download, whose repo_info request has no timeout: it hung until the 60 s limit here."""
    rc, _, err = run(["eval.py", "--model", "org/name", "--prompt", "x"], tmp_path, HF_ENDPOINT=silent_server)
    assert rc != 0 and len(err) == 1, err
    assert err[0].startswith(f"could not reach the hub ({silent_server}) for org/name (ReadTimeout"), err
    assert "each request times out after 2 s" in err[0] and "set HF_HUB_OFFLINE=1" in err[0], err
    # the hub part: huggingface_hub's agent-registry request (its own 3 s timeout, with a fresh HF_HOME) + our 2 s
    # repo_info request; 3 s of slack for a loaded machine. The process start (torch import) comes on top.
    hub_s = float(err[0].split(", after ")[1].split(" s;")[0])
    assert hub_s < 3 + 2 + 3, err[0]


def test_a_refused_hub_is_one_line_at_once_in_every_cli(tmp_path):
    """e7b8d93 let huggingface_hub's LocalEntryNotFoundError through: a traceback of some 90 lines."""
    endpoint = closed_port()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"base": "org/name"}')
    for args in (["eval.py", "--model", "org/name", "--prompt", "x"],
                 ["train.py", "configs/benchmark.json", "--base=org/name", f"--out={tmp_path / 'train_out'}"],
                 ["merge.py", str(tmp_path / "run"), str(tmp_path / "merged")]):
        rc, _, err = run(args, tmp_path, HF_ENDPOINT=endpoint)
        assert rc != 0 and len(err) == 1, (args, err)
        assert err[0].startswith(f"could not reach the hub ({endpoint}) for org/name (ConnectError"), (args, err)
        assert float(err[0].split(", after ")[1].split(" s;")[0]) < 2, err[0]  # refused: no waiting on a timeout
    assert not os.path.exists(tmp_path / "train_out") and not os.path.exists(tmp_path / "merged")


def test_offline_mode_uses_the_cache_or_says_it_is_not_cached(tmp_path):
    """e7b8d93: an uncached id under HF_HUB_OFFLINE=1 was a traceback as well."""
    endpoint = closed_port()  # offline mode must not even try it
    rc, _, err = run(["eval.py", "--model", "org/name", "--prompt", "x"], tmp_path, HF_ENDPOINT=endpoint,
                     HF_HUB_OFFLINE="1")
    assert rc != 0 and len(err) == 1 and err[0].startswith("org/name is not in the local hub cache ("), err
    assert "HF_HUB_OFFLINE=1" in err[0]
    # a cached snapshot (the hub cache layout: refs/main names the commit, snapshots/<commit> holds the files)
    repo = tmp_path / "hf_home" / "hub" / "models--org--name"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    rc, out, err = run(["-c", "import load; print(load.resolve('org/name'))"], tmp_path, HF_ENDPOINT=endpoint,
                       HF_HUB_OFFLINE="1")
    assert rc == 0 and out.strip() == str(repo / "snapshots" / commit), (out, err)


def test_timeout_setting_is_checked(tmp_path):
    rc, _, err = run(["eval.py", "--model", "org/name", "--prompt", "x"], tmp_path, HF_ENDPOINT=closed_port(),
                     GUIVLM_HUB_TIMEOUT="soon")
    assert rc != 0 and err == ["GUIVLM_HUB_TIMEOUT='soon': expected a number of seconds > 0"]


def test_a_local_path_is_never_a_hub_id(tmp_path, monkeypatch):
    """e7b8d93 sent "runs/ckpt" (one slash) to the hub although runs/ is a local folder without ckpt in it."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path went to the hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("runs/ckpt", "./ckpt", "ckpt", str(tmp_path / "ckpt"), "~/ckpt", "a/b/c", "../x/y"):
        with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
            load.resolve(path)
    rc, _, err = run(["eval.py", "--model", "./nosuch", "--prompt", "x"], tmp_path)
    assert rc != 0 and err == ["eval.py: ./nosuch: no such checkpoint folder (and not a hub id, owner/name)"], err
