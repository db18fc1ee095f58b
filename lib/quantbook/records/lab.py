"""Open a run for inspection in JupyterLab: `quantbook lab RUN_DIR`.

After calibration, before paying for serving, a person opens the run's executed notebook 04 and
moves the explorers' controls. This does the set-up that makes that work wherever the run now is:

- the notebook: `04_inspect_amax.lab.ipynb`, written beside the record, keeps the record's outputs
  (its figures show at once) and parameters, with `run_dir = "."` (JupyterLab starts a kernel in
  its notebook's directory: the run, even moved or copied) and the other parameters' relative paths
  made absolute against the directory `quantbook run` ran in. The record itself is never opened,
  and autosave is off, so nothing overwrites what the run recorded;
- the server: this environment's JupyterLab rooted at the run directory, on 127.0.0.1 and a free
  port with a fresh token, its settings, config and runtime files in a temporary directory; this
  environment's kernelspecs first, and the notebook's kernel checked to start this interpreter
  (the one with quantbook) before the address is printed;
- the end: Ctrl-C (or SIGTERM) shuts the kernels down, then the server.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..atomic import read_json, write_text
from ..errors import RunError
from ..machine import free_port
from .runs import MANIFEST, runs_this_python

RECORD = "04_inspect_amax.ipynb"
LAB_NOTEBOOK = "04_inspect_amax.lab.ipynb"
STEP = "04_inspect_amax"
# JupyterLab user settings (plugin -> values) for a session on a run
SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},  # the record's copy is not saved behind your back
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},  # every cell rendered, none detached
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}


# -- the notebook --------------------------------------------------------------------------------
def _parameters(source: str) -> dict:
    """`name = literal` assignments of a papermill parameters cell."""
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError, SyntaxError):
                values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def lab_parameters(values: dict, cwd: str | Path | None) -> dict:
    """The record's parameters for a kernel started in the run directory: run_dir ".", and a
    relative path that exists from `cwd` (where `quantbook run` ran) made absolute."""
    out = dict(values)
    for k, v in values.items():
        if cwd and isinstance(v, str) and v and not os.path.isabs(v) and (Path(cwd) / v).exists():
            out[k] = str(Path(cwd) / v)
    out["run_dir"] = "."
    return out


def lab_notebook(run_dir: str | Path) -> Path:
    """Write `04_inspect_amax.lab.ipynb` beside the run's executed notebook 04 (see the module's
    docstring) and return it."""
    run_dir = Path(run_dir)
    record = run_dir / RECORD
    if not record.is_file():
        raise RunError(f"{record} not found: step 04 has not run in {run_dir} "
                       f"(quantbook run PARAMS --steps 04 --run-id {run_dir.name})")
    nb = json.loads(record.read_text())
    cells = nb.get("cells", [])
    injected = [c for c in cells if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    if not injected:
        raise RunError(f"{record} has no injected parameters: not a notebook `quantbook run` executed")
    step = ((read_json(run_dir / MANIFEST) or {}).get("steps") or {}).get(STEP) or {}
    values = lab_parameters(_parameters("".join(injected[0]["source"])), step.get("cwd"))
    lines = ["# Parameters (quantbook lab: the run's, with run_dir = '.')"]
    lines += [f"{k} = {v!r}" for k, v in values.items()]
    injected[0]["source"] = [line + "\n" for line in lines[:-1]] + lines[-1:]
    nb.get("metadata", {}).pop("widgets", None)  # no stale widget state restored into a live page
    out = run_dir / LAB_NOTEBOOK
    write_text(out, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return out


def kernel_name(notebook: str | Path) -> str:
    """The kernelspec name a notebook asks for (what JupyterLab starts it with)."""
    return (json.loads(Path(notebook).read_text()).get("metadata", {}).get("kernelspec") or {}).get("name", "python3")


# -- the server ------------------------------------------------------------------------------------
class LabServer:
    """`with LabServer(root) as lab:` JupyterLab serving `root` (see the module's docstring);
    `lab.url(path)`, `lab.api(path)`. On exit every kernel is shut down, then the server, then
    whatever is left of its process group; also when the block raised."""

    def __init__(self, root_dir: str | Path, port: int | None = None, ip: str = "127.0.0.1",
                 token: str | None = None, settings: dict | None = None, env: dict | None = None,
                 log_path: str | Path | None = None, start_timeout: float = 120):
        self.root_dir = Path(root_dir).resolve()
        self.ip = ip
        self.port = port or free_port(ip if ip not in ("0.0.0.0", "::") else "127.0.0.1")
        self.token = token or secrets.token_hex(16)
        self.settings = {**SETTINGS, **(settings or {})}
        self.extra_env = dict(env or {})
        self.log_path = Path(log_path) if log_path else None
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log = None

    @property
    def base(self) -> str:
        host = "127.0.0.1" if self.ip in ("0.0.0.0", "::", "") else self.ip
        return f"http://{host}:{self.port}"

    def url(self, path: str = "lab") -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET", body=None, timeout: float = 10):
        """A JupyterLab REST call (`api/...`, `lab/api/...`) with the token; the decoded JSON reply."""
        path = path.lstrip("/")
        req = urllib.request.Request(f"{self.base}/{path if path.startswith('lab/') else 'api/' + path}",
                                     method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def __enter__(self) -> "LabServer":
        self._tmp = tempfile.TemporaryDirectory(prefix="quantbook-lab-")
        tmp = Path(self._tmp.name)
        for plugin, values in self.settings.items():
            f = tmp / "settings" / f"{plugin}.jupyterlab-settings"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(values))
        env = {**os.environ,
               "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
               "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
               # this environment's kernelspecs and lab extensions (ipywidgets') before a user's
               "JUPYTER_PATH": os.pathsep.join([str(Path(sys.prefix) / "share" / "jupyter"),
                                                *filter(None, [os.environ.get("JUPYTER_PATH")])]),
               "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # debugpy's frozen-modules warning in every kernel
               **self.extra_env}
        env.pop("JUPYTER_TOKEN", None)
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.ip={self.ip}",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
               "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               # if this process is killed before it can shut the server down: idle kernels are
               # culled after 10 minutes, the server stops itself after 15 without activity
               "--MappingKernelManager.cull_idle_timeout=600", "--ServerApp.shutdown_no_activity_timeout=900"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        log = self.log_path or tmp / "jupyter.log"
        self._log = open(log, "w")
        # its own session: a Ctrl-C in the terminal reaches this process, which shuts the server down in order
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.root_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(log)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self, log: Path) -> None:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.05
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log.read_text()[-2000:] if log.is_file() else ""
                raise RunError(f"jupyter lab exited with code {self.proc.returncode} (port {self.port} taken? "
                               f"choose another with --port):\n{tail}")
            try:
                self.api("status", timeout=2)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(delay)  # the interval of a readiness probe
                delay = min(delay * 1.5, 0.5)
        raise RunError(f"jupyter lab did not answer on {self.base} within {self.start_timeout:.0f} s (log: {log})")

    def check_kernel(self, name: str) -> str:
        """Refuse a kernelspec `name` that does not start this interpreter; its display name."""
        spec = (self.api("kernelspecs").get("kernelspecs") or {}).get(name)
        if spec is None:
            raise RunError(f"JupyterLab has no kernel {name!r}; install this environment's: "
                           f"{sys.executable} -m ipykernel install --sys-prefix --name {name}")
        argv = spec["spec"].get("argv") or [""]
        if not runs_this_python(argv[0]):
            raise RunError(f"kernel {name!r} starts {argv[0]}, not {sys.executable} (where quantbook is); install "
                           f"this environment's: {sys.executable} -m ipykernel install --sys-prefix --name {name}")
        return spec["spec"].get("display_name", name)

    def shutdown_kernels(self) -> None:
        for k in self.api("kernels") or []:
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.api(f"kernels/{k['id']}", method="DELETE", timeout=30)

    def __exit__(self, *exc) -> bool:
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                    self.shutdown_kernels()
                with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                    self.api("shutdown", method="POST", timeout=10)
                for sig, wait in ((None, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                    if sig is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, sig)
                    try:
                        proc.wait(timeout=wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            if proc is not None:  # anything the server left in its process group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if self._log is not None:
                self._log.close()
            if self._tmp is not None:
                self._tmp.cleanup()
        return False


# -- the command ------------------------------------------------------------------------------------
def open_run(run_dir: str | Path, port: int | None = None, ip: str = "127.0.0.1", browser: bool = False,
             echo=print, stop: threading.Event | None = None) -> None:
    """`quantbook lab RUN_DIR`: write the lab notebook, serve the run, print the address, wait for
    Ctrl-C / SIGTERM (or `stop`), shut everything down."""
    run_dir = Path(run_dir).resolve()
    nb = lab_notebook(run_dir)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        _serve(run_dir, nb, port, ip, browser, echo, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(run_dir: Path, nb: Path, port, ip: str, browser: bool, echo, stop: threading.Event) -> None:
    with LabServer(run_dir, port=port, ip=ip) as lab:
        shown = lab.check_kernel(kernel_name(nb))
        url = lab.url(f"lab/tree/{nb.name}")
        echo(f"run:      {run_dir}\nnotebook: {nb.name} (the record's outputs; run_dir = '.'; autosave off)\n"
             f"kernel:   {shown}\nopen:     {url}")
        if ip in ("127.0.0.1", "localhost"):
            echo(f"from another machine: ssh -N -L {lab.port}:127.0.0.1:{lab.port} {socket.gethostname()}, "
                 "then open the address above")
        echo("Ctrl-C stops the kernels and the server")
        if browser:
            import webbrowser

            webbrowser.open(url)
        while not stop.wait(1.0) and lab.proc.poll() is None:
            pass
