"""`make lab`, the third way users work: its recipe starts as root too, and the server it runs lists the eight
notebooks and offers the kernel "Python (bsbr)".

The server test runs the recipe's own commands (read with ``make -n lab``) with the test's interpreter, on a free
port with a token and with every Jupyter folder in a temporary directory (the kernel is registered there, not in
the environment). It needs the ``lab`` extra, which ``make setup`` installs with ``dev``.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted(path.name for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
KERNEL_NAME, KERNEL_DISPLAY_NAME = "bsbr", "Python (bsbr)"
START_TIMEOUT_S = 120  # a cold start on a busy 2-core machine; the test returns as soon as the server answers


def lab_recipe(tmp_path: Path, uid: int | None = None) -> list[list[str]]:
    """The commands of ``make lab``'s own recipe (its ``setup`` prerequisite left out), as ``make -n`` prints them.

    uid: the effective user id ``id -u`` reports to make (a stub ``id`` first on PATH); None: the real one.
    """
    env = dict(os.environ)
    if uid is not None:
        stub = tmp_path / f"uid{uid}"
        stub.mkdir()
        (stub / "id").write_text(f"#!/bin/sh\necho {uid}\n")
        (stub / "id").chmod(0o755)
        env["PATH"] = f"{stub}{os.pathsep}{env['PATH']}"
    printed = subprocess.run(["make", "-n", "--no-print-directory", "lab"], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
    commands = [shlex.split(line) for line in printed.splitlines() if line.strip()]
    first = next(i for i, argv in enumerate(commands) if argv[1:4] == ["-m", "ipykernel", "install"])
    return commands[first:]  # setup's commands (printed only when .venv is stale) come before


@pytest.mark.parametrize("uid, expected", [(0, ["jupyter", "lab", "--allow-root", "notebooks/"]),
                                           (1000, ["jupyter", "lab", "notebooks/"])])
def test_lab_recipe_allows_root_only_for_root(tmp_path, uid, expected):
    install, start = lab_recipe(tmp_path, uid)
    assert install == [".venv/bin/python", "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL_NAME,
                       "--display-name", KERNEL_DISPLAY_NAME]
    assert start == expected


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(port: int, token: str, path: str, method: str = "GET", body: dict | None = None) -> dict | list:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else {}


def run_in_kernel(connection_file: Path, code: str) -> str:
    """What ``code`` prints (stdout) in the running kernel of ``connection_file``; fails if it raises."""
    from jupyter_client import BlockingKernelClient

    client = BlockingKernelClient(connection_file=str(connection_file))
    client.load_connection_file()
    client.start_channels()
    printed = []

    def on_output(message):
        if message["msg_type"] == "stream" and message["content"]["name"] == "stdout":
            printed.append(message["content"]["text"])

    try:
        client.wait_for_ready(timeout=START_TIMEOUT_S)
        reply = client.execute_interactive(code, timeout=START_TIMEOUT_S, output_hook=on_output)
    finally:
        client.stop_channels()
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(printed)


def test_lab_server_lists_the_notebooks_and_the_bsbr_kernel(tmp_path):
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        pytest.fail("JupyterLab is not installed: `pip install -e '.[dev,lab]'` (what `make setup` installs)")
    install, start = lab_recipe(tmp_path)
    assert start[:2] == ["jupyter", "lab"] and ("--allow-root" in start) == (os.geteuid() == 0)
    jupyter = {name: tmp_path / name for name in ("data", "config", "runtime", "ipython", "workspaces", "settings")}
    env = {**os.environ, "JUPYTER_DATA_DIR": str(jupyter["data"]), "JUPYTER_CONFIG_DIR": str(jupyter["config"]),
           "JUPYTER_RUNTIME_DIR": str(jupyter["runtime"]), "IPYTHONDIR": str(jupyter["ipython"]),
           "JUPYTERLAB_WORKSPACES_DIR": str(jupyter["workspaces"]), "JUPYTERLAB_SETTINGS_DIR": str(jupyter["settings"])}

    # the recipe's kernel registration, into the temporary data folder instead of the environment
    assert install[4] == "--sys-prefix"
    subprocess.run([sys.executable, *install[1:4], "--user", *install[5:]], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    spec = json.loads((jupyter["data"] / "kernels" / KERNEL_NAME / "kernel.json").read_text())
    assert spec["display_name"] == KERNEL_DISPLAY_NAME and spec["argv"][0] == sys.executable

    port, token = free_port(), "bsbr-test-token"
    log = tmp_path / "server.log"
    with log.open("w") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "jupyterlab", *start[2:], "--no-browser", f"--port={port}",
                                   "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
                                   f"--IdentityProvider.token={token}"],
                                  cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert server.poll() is None, f"the server exited with {server.returncode}:\n{log.read_text()[-4000:]}"
            try:
                status = api(port, token, "status")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"no answer in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
                time.sleep(0.5)
        assert status["kernels"] == 0

        with pytest.raises(urllib.error.HTTPError) as refused:  # the token is required
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=30)
        assert refused.value.code == 403

        # the recipe opens notebooks/ as the server's root: its contents are the eight notebooks
        root = api(port, token, "contents")
        assert root["path"] == "" and root["type"] == "directory"
        listed = sorted(item["name"] for item in root["content"] if item["type"] == "notebook")
        assert listed == NOTEBOOKS and len(listed) == 8
        opened = api(port, token, f"contents/{NOTEBOOKS[0]}")
        assert opened["type"] == "notebook" and opened["content"]["cells"]

        specs = api(port, token, "kernelspecs")
        assert specs["kernelspecs"][KERNEL_NAME]["spec"]["display_name"] == KERNEL_DISPLAY_NAME
        assert specs["kernelspecs"][KERNEL_NAME]["spec"]["argv"][0] == sys.executable

        # the kernel starts and runs code in the project's environment (a client on its connection file; the
        # server reports it idle once it has answered)
        kernel = api(port, token, "kernels", "POST", {"name": KERNEL_NAME})
        assert kernel["name"] == KERNEL_NAME
        assert [k["id"] for k in api(port, token, "kernels")] == [kernel["id"]]
        printed = run_in_kernel(jupyter["runtime"] / f"kernel-{kernel['id']}.json",
                                "import sys, bsbr\nprint(sys.prefix)")  # an ImportError fails the run
        assert printed == f"{sys.prefix}\n"
        deadline = time.monotonic() + START_TIMEOUT_S
        while (state := api(port, token, f"kernels/{kernel['id']}")["execution_state"]) != "idle":
            assert time.monotonic() < deadline, f"kernel {state} after it answered"
            time.sleep(0.2)
        api(port, token, f"kernels/{kernel['id']}", "DELETE")
        assert api(port, token, "kernels") == []
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
