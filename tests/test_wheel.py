"""The wheel outside a checkout: built, installed into a fresh venv, and run from an empty folder with the
real default models (`rayrag serve` answering over HTTP, `rayrag ask --local`, the experiment's data stage).

The fresh venv gets the heavy dependencies by a .pth line naming this venv's site-packages: a plain path
line adds the folder to sys.path without running the editable install's finder, so `cluster`,
`services`, `training` and the packaged files can only come from the wheel."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from services.rag.loading import cache_root

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# what a checkout may hold beside the source (.gitignore, caches, mutation testing)
NOT_SOURCE = (
    ".git .venv build dist *.egg-info __pycache__ .*_cache .rayrag-cache runs indexes mutants".split()
)
QUESTION = "Who directed 2001: A Space Odyssey?"
CORPUS = [
    {
        "title": "2001: A Space Odyssey",
        "text": "2001: A Space Odyssey is a 1968 film directed by Stanley Kubrick.",
    },
    {"title": "Photosynthesis", "text": "Plants turn light, water and carbon dioxide into sugar and oxygen."},
    {
        "title": "Mount Everest",
        "text": "Mount Everest, in the Himalayas, is the highest mountain above sea level.",
    },
    {"title": "Jazz", "text": "Jazz is a music genre that began in New Orleans in the late 19th century."},
]
COMMAND_TIMEOUT_S = 900  # a bound, not a measurement: the slowest step (serve start-up, contended cores)


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def _without_checkout() -> dict[str, str]:
    """This process's environment without PYTHONPATH: nothing may see a checkout."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel alone; the dependencies are read from this venv's site-packages."""
    root, env = tmp_path_factory.mktemp("wheel"), _without_checkout()
    source = root / "source"  # a copy, so no earlier build/ folder leaks stale files into the wheel
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    pip = [sys.executable, "-m", "pip"]
    wheels = root / "dist"
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True, env=env
    )
    [wheel] = wheels.glob("rayrag-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, env=env)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", "-q", "--no-deps", wheel], check=True, env=env)
    # after the install, so pip never sees the editable rayrag of this venv
    (_site_packages(python) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.fixture(scope="module")
def run_env(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of the installed commands: no PYTHONPATH to a checkout, the converted models of
    this machine's cache, the shard file cache in a temporary folder."""
    return _without_checkout() | {
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "RAYRAG_CACHE": str(cache_root()),
        "RAYRAG_SHARD_CACHE": str(tmp_path_factory.mktemp("shard-cache")),
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture()
def empty_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def _run(args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, f"{args}: {done.stderr[-4000:]}"
    return done.stdout


def test_the_package_and_its_data_come_from_the_wheel(
    venv: Path, run_env: dict[str, str], empty_dir: Path
) -> None:
    code = (
        "import json, cluster, services, training, rayrag_cli; "
        "from services.serving.serve_file import PACKAGED, read_serve_file; "
        "from cluster.passages import squad_dev_path; from training.data import SHIPPED_CLAIMS; "
        "from training.presets import FOLDER, NAMES; "
        "files = [m.__file__ for m in (cluster, services, training, rayrag_cli)]; "
        "files += [str(p) for p in (PACKAGED, squad_dev_path(), SHIPPED_CLAIMS, FOLDER / 'cpu.yaml')]; "
        "print(json.dumps({'files': files, 'app': read_serve_file().app.name, 'presets': NAMES}))"
    )
    out = json.loads(_run([str(venv / "bin" / "python"), "-c", code], run_env, empty_dir))
    site = _site_packages(venv / "bin" / "python")
    assert all(Path(f).is_relative_to(site) and Path(f).is_file() for f in out["files"]), out
    assert out["app"] == "rayrag" and out["presets"] == ["cpu", "cpu_retrievers", "gpu"]
    packaged = out["files"][4]
    wide = run_env | {"COLUMNS": "1000"}  # one help line per option: the path is not wrapped
    assert f"else {packaged})" in _run(["rayrag", "serve", "--help"], wide, empty_dir)


def _write_corpus(folder: Path) -> None:
    (folder / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CORPUS))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_line(process: subprocess.Popen, needle: str, timeout_s: float, log: Path) -> None:
    """Read stdout up to the line holding `needle`; fail (with the log's tail) if the process ends or
    time runs out first."""
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in iter(process.stdout.readline, ""):
            seen.append(line)
            if needle in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not found.wait(1.0):
        assert process.poll() is None, f"exited with {process.returncode}: {log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout_s} s: {log.read_text()[-4000:]}"


def _ask_http(url: str) -> dict:
    body = {"question": QUESTION, "n_docs": 2, "num_beams": 1, "max_new_tokens": 8}
    request = urllib.request.Request(
        f"{url}/v1/answer", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def test_serve_answers_over_http_then_stops_on_sigterm(
    venv: Path, run_env: dict[str, str], empty_dir: Path
) -> None:
    _write_corpus(empty_dir)
    _run(["rayrag", "index", "build", "--corpus", "corpus.jsonl", "--index-root", "idx"], run_env, empty_dir)
    port, log = _free_port(), empty_dir.parent / "serve.log"
    serve = subprocess.Popen(
        ["rayrag", "serve", "--index-root", "idx", "--port", str(port)],  # the packaged deploy.yaml
        env=run_env,
        cwd=empty_dir,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_line(serve, "rayrag is serving on", COMMAND_TIMEOUT_S, log)
        answer = _ask_http(f"http://127.0.0.1:{port}")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=120) == 0
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    assert answer["index_version"] == "v0001" and answer["index_coverage"] == 1
    assert answer["docs"][0]["title"] == CORPUS[0]["title"] and answer["answer"].strip()


def test_ask_local_answers_from_the_corpus(run_env: dict[str, str], empty_dir: Path) -> None:
    _write_corpus(empty_dir)
    args = ["--corpus", "corpus.jsonl", "--n-docs", "2", "--num-beams", "1", "--max-new-tokens", "8"]
    out = _run(["rayrag", "ask", "--local", QUESTION, *args], run_env, empty_dir).splitlines()
    assert out[0].startswith("Answer: ") and out[0] != "Answer: "
    assert out[2].startswith(f"  1. {CORPUS[0]['title']} (dense"), out


def test_experiment_data_stage_of_the_cpu_preset(run_env: dict[str, str], empty_dir: Path) -> None:
    out = _run(
        ["rayrag", "experiment", "--preset", "cpu", "--out", "exp", "--until", "data"], run_env, empty_dir
    )
    line = json.loads(out.splitlines()[-1])
    assert line["name"] == "squad-cpu" and line["stopped_after"] == "data"
    data = line["data"]
    articles = (data["train_articles"], data["validation_articles"], data["test_articles"])
    assert articles == (30, 6, 12) and (data["validation_questions"], data["test_questions"]) == (200, 1000)
    assert data["passages"] > data["passages_without_test"] > 10_000  # + the default corpus's leads
    test = (empty_dir / "exp" / "data" / "test.jsonl").read_text().splitlines()
    assert len(test) == 1000 and [p.name for p in (empty_dir / "exp" / "stages").iterdir()] == ["data.json"]
