"""The hf_ptq driver: checkout version, flags checked against hf_ptq's parser, its __main__ block,
the CPU guard, the export hook; and, with a real Model-Optimizer checkout, bit-identical exports
from both drivers on the tiny V4.

The wiring tests run a test double of hf_ptq's interface (tests/hfptq_double); it proves the
argv, conversion and hook plumbing, not that the real script works. The real-checkout tests run
when $QUANTBOOK_HF_PTQ_DIR names a checkout's examples/hf_ptq folder and skip otherwise.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantbook.calibrate import driver
from quantbook.calibrate import hf_ptq_driver as hfptq
from quantbook.errors import ParamsError

DOUBLE = Path(__file__).parent / "hfptq_double"
REAL = os.environ.get(hfptq.CHECKOUT_ENV)
INSTALLED = hfptq.installed_modelopt()
MINOR = ".".join(INSTALLED.split(".")[:2])


def make_checkout(root: Path, heading: str) -> Path:
    """A checkout layout holding the double: <root>/CHANGELOG.rst, <root>/examples/hf_ptq/*.py."""
    folder = root / "examples" / "hf_ptq"
    folder.mkdir(parents=True)
    for f in DOUBLE.glob("*.py"):
        shutil.copy(f, folder / f.name)
    (root / "CHANGELOG.rst").write_text(f"Changelog\n=========\n\n{heading}\n^^^^^^^^^^^^^^^^^\n\n- things\n")
    return folder


@pytest.fixture
def events(tmp_path, monkeypatch):
    """The double's event log: call it to read; `.log(event)` appends from the test's side."""
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv("QB_DOUBLE_EVENTS", str(path))

    def read():
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def log(event, **facts):
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, **facts}) + "\n")

    read.log = log
    return read


@pytest.fixture
def double(tmp_path):
    return make_checkout(tmp_path / "Model-Optimizer", f"{MINOR} (2026-09-23)")


def q_for(folder, tmp_path, **settings):
    base = {"pyt_ckpt_path": str(tmp_path / "no-model"), "export_path": str(tmp_path / "export"),
            "qformat": "nvfp4_experts_only", "dataset": ["a.jsonl", "b.jsonl"], "calib_size": "16,8",
            "batch_size": 4, "device": "cpu", "skip_generate": True}
    return {"driver": "hf_ptq", "hf_ptq_dir": str(folder), "force": False, "hf_ptq": {**base, **settings}}


# ----------------------------------------------------------------------------- versions

@pytest.mark.parametrize("heading, release", [("0.47 (2026-09-23)", True), ("0.47 (2026-09-xx)", False),
                                              ("0.47.1 (2026-10-02)", True)])
def test_version_from_changelog(tmp_path, heading, release):
    v = hfptq.checkout_version(make_checkout(tmp_path / "mo", heading))
    assert (v.source, v.text, v.release) == ("CHANGELOG.rst", heading, release)


@pytest.mark.parametrize("text, source, release, installed, match", [
    ("0.47.0", "git describe", True, "0.47.0", True),
    ("0.47.0", "git describe", True, "0.47.1", False),
    ("0.47.0dev-81-ga2fbac7ba", "git describe", False, "0.47.0", False),
    ("0.47 (2026-09-23)", "CHANGELOG.rst", True, "0.47.0", True),
    ("0.47 (2026-09-xx)", "CHANGELOG.rst", False, "0.47.0", False),  # the dev snapshot of the same minor
    ("0.46 (2026-08-17)", "CHANGELOG.rst", True, "0.47.0", False),
    ("0.47 (2026-09-23)", "CHANGELOG.rst", True, "0.47.0rc1", False),  # installed is not a release
])
def test_version_match_rules(text, source, release, installed, match):
    version = text.split(" ")[0].split("-")[0]
    v = hfptq.CheckoutVersion(text, version, release, source)
    assert (hfptq.version_mismatch(v, installed) is None) == match


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_version_from_git_describe(tmp_path):
    root = tmp_path / "mo"
    folder = make_checkout(root, "0.47 (2026-09-xx)")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    subprocess.run([*git, "tag", "0.47.0"], check=True)
    v = hfptq.checkout_version(folder)
    assert (v.text, v.source, v.release) == ("0.47.0", "git describe", True)  # git wins over the CHANGELOG
    (folder / "hf_ptq.py").write_text((folder / "hf_ptq.py").read_text() + "\n# edited\n")
    v = hfptq.checkout_version(folder)
    assert v.text == "0.47.0-dirty" and not v.release
    subprocess.run([*git, "commit", "-qam", "two"], check=True)
    v = hfptq.checkout_version(folder)
    assert v.text.startswith("0.47.0-1-g") and not v.release
    subprocess.run([*git, "tag", "0.48.0dev"], check=True)
    assert not hfptq.checkout_version(folder).release


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_repo_around_an_extracted_checkout_is_not_its_version(tmp_path):
    outer = tmp_path / "project"
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    folder = make_checkout(outer / "vendor" / "mo", f"{MINOR} (2026-09-23)")
    assert hfptq.checkout_version(folder).source == "CHANGELOG.rst"


def test_undeterminable_version_refused_unless_forced(tmp_path, capsys):
    folder = make_checkout(tmp_path / "mo", "no heading here")
    with pytest.raises(ParamsError, match=f"cannot determine.*installed nvidia-modelopt is {INSTALLED}"):
        hfptq.check_checkout(folder)
    with pytest.warns(UserWarning, match="mismatched"):
        facts = hfptq.check_checkout(folder, force=True)
    assert facts["forced"] and not facts["match"] and "WARNING (quantize.force: true)" in capsys.readouterr().err


def test_mismatch_refused_with_both_versions_before_hf_ptq_is_imported(tmp_path, events):
    folder = make_checkout(tmp_path / "mo", f"{MINOR} (2026-09-xx)")
    with pytest.raises(ParamsError) as e:
        hfptq.run(q_for(folder, tmp_path), tmp_path / "run")
    assert f"{MINOR} (2026-09-xx)" in str(e.value) and INSTALLED in str(e.value) and "force" in str(e.value)
    assert events() == []


# ----------------------------------------------------------------------------- flags

def test_argv_in_hf_ptq_flag_names(double):
    with hfptq.hf_ptq_module(double) as m:
        parser = hfptq.hf_ptq_parser(m)
    argv = hfptq.build_argv({"pyt_ckpt_path": "/m", "dataset": ["a.jsonl", "b.jsonl"], "calib_size": [16, 8],
                             "batch_size": 4, "skip_generate": True, "low_memory_mode": False,
                             "verbose": False, "recipe": None, "calib_seq": 64}, parser)
    assert argv == ["--pyt_ckpt_path=/m", "--dataset=a.jsonl,b.jsonl", "--calib_size=16,8", "--batch_size=4",
                    "--skip_generate", "--no-verbose", "--calib_seq=64"]


@pytest.mark.parametrize("settings, needle", [
    ({"skip_gen": True}, "no flag --skip_gen; did you mean ['skip_generate']"),
    ({"model": "/m"}, "write hf_ptq's setting name 'pyt_ckpt_path'"),
    ({"skip_generate": "yes"}, "a switch (--skip_generate); write true or false"),
    ({"verbose": 1}, "a switch (--verbose/--no-verbose)"),
    ({"calib_seq": True}, "--calib_seq takes a value"),
    ({"pyt_ckpt_path": None}, "pyt_ckpt_path: required"),
    ({"kv_cache_qformat": "int4"}, "invalid choice"),  # argparse's own check, through hf_ptq's parse_args
    ({"calib_seq": "long"}, "invalid int value"),
])
def test_wrong_settings_refused_before_anything_loads(double, tmp_path, events, settings, needle):
    with pytest.raises(ParamsError) as e:
        hfptq.checkout_preflight(q_for(double, tmp_path, **settings))
    assert needle in str(e.value)
    assert [e["event"] for e in events()] in ([], ["imported"])  # hf_ptq's main never ran


@pytest.mark.parametrize("settings, needle", [
    ({"qformat": "fp8", "cast_mxfp4_to_nvfp4": True}, "needs an nvfp4 qformat"),
    ({"specdec_offline_dataset": "/d"}, "takes one calib_size"),
])
def test_main_block_checks_become_params_errors(double, tmp_path, events, settings, needle):
    with pytest.raises(ParamsError, match="__main__ checks refused"):
        hfptq.checkout_preflight(q_for(double, tmp_path, **settings))


def test_shell_script_names_refused_by_the_shared_checks(double, tmp_path, events):
    with pytest.raises(ParamsError, match="--kv_cache_quant -> --kv_cache_qformat"):
        hfptq.checkout_preflight(q_for(double, tmp_path, kv_cache_quant="fp8"))
    assert events() == []  # refused before hf_ptq is even imported


# ----------------------------------------------------------------------------- running

def test_run_wiring(double, tmp_path, events, monkeypatch):
    import torch

    real_is_available = torch.cuda.is_available
    path_before = list(sys.path)
    monkeypatch.setattr(hfptq.patches, "apply", lambda force=False: events.log("patches") or ["double"])

    def hook(full_model, args):
        events.log("hook", model=type(full_model).__name__)

    if torch.cuda.is_available():
        pytest.skip("the CPU guard is inactive on a CUDA machine")
    q = {**q_for(double, tmp_path, verbose=False), "export_generic": True}
    rec = hfptq.run(q, tmp_path / "run", hook=hook)
    ev = events()
    assert [e["event"] for e in ev] == ["imported", "patches", "main", "calibrate", "hook", "export"]
    main = ev[2]
    assert main["calib_size"] == [16, 8] and main["dataset"] == ["a.jsonl", "b.jsonl"]  # __main__ conversions
    assert main["verbose"] is False and main["skip_generate"] is True
    assert main["helper_sees_cuda"] is False and main["main_sees_cuda_again"] is False  # only the guard line passes
    assert ev[5]["model_type"] == "double" and ev[5]["pad"] == "<pad>"  # all seven parameters passed through
    src = (double / "hf_ptq.py").read_text().splitlines()
    assert len(rec["cpu_rehearsal_guard_lines"]) == 1
    assert "if not torch.cuda.is_available():" in src[rec["cpu_rehearsal_guard_lines"][0] - 1]
    assert json.loads((tmp_path / "run" / driver.RESULT).read_text()) == json.loads(json.dumps(rec))
    assert rec["status"] == "done" and rec["patches"] == ["double"] and rec["driver"] == "hf_ptq"
    assert rec["hf_ptq"]["match"] and not rec["hf_ptq"]["forced"]
    assert "--export_path=" + str(tmp_path / "export.partial") in rec["hf_ptq"]["argv"]  # renamed when complete
    assert (tmp_path / "export" / "args.json").exists() and not (tmp_path / "export.partial").exists()
    assert rec["export"] == {"written": True, "dir": str(tmp_path / "export")}
    assert set(rec["timings"]) == {"snapshot_and_state", "export", "finalize"}  # the double has no load_model
    # nothing left behind: sys.path, the checkout's modules, torch.cuda.is_available
    assert sys.path == path_before and "hf_ptq" not in sys.modules and "double_utils" not in sys.modules
    assert torch.cuda.is_available is real_is_available


def test_no_generic_export_unless_asked(double, tmp_path, events, monkeypatch):
    """Without `export_generic`, hf_ptq's export call ends after the post-calibration hook: nothing is
    written under export_path, and the record says why."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU guard is inactive on a CUDA machine")
    monkeypatch.setattr(hfptq.patches, "apply", lambda force=False: [])
    rec = hfptq.run(q_for(double, tmp_path), tmp_path / "run", hook=lambda full_model, args: events.log("hook"))
    assert [e["event"] for e in events()][-2:] == ["calibrate", "hook"]  # hf_ptq's own export never ran
    assert rec["export"]["written"] is False and "export_generic is false" in rec["export"]["why"]
    assert not (tmp_path / "export").exists() and not (tmp_path / "export.partial").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "generic-export" in p.name) == []
    assert set(rec["timings"]) == {"snapshot_and_state", "finalize"}
    argv = rec["hf_ptq"]["argv"]
    assert "--export_path=" + str(tmp_path / "run" / "generic-export.partial") in argv  # its summary, then dropped


def test_default_hook_gets_the_calibration_data_and_counts(double, tmp_path, events, monkeypatch):
    import torch

    from quantbook.calibrate import state

    if torch.cuda.is_available():
        pytest.skip("the CPU guard is inactive on a CUDA machine")
    monkeypatch.setattr(hfptq.patches, "apply", lambda force=False: [])
    got = {}

    def post_calibration(model, run_dir, q, ledger, **kw):
        events.log("hook")
        got.update(kw, model=model, run_dir=run_dir)
        return {"state": "saved"}

    monkeypatch.setattr(state, "post_calibration", post_calibration)
    q = {**q_for(double, tmp_path), "export_generic": True}
    rec = hfptq.run(q, tmp_path / "run")
    assert [e["event"] for e in events()][-3:] == ["calibrate", "hook", "export"]
    assert isinstance(got["model"], torch.nn.Linear) and got["run_dir"] == tmp_path / "run"
    assert got["model_path"] == q["hf_ptq"]["pyt_ckpt_path"]
    assert got["calib"]["samples"] == 24 and got["calib"]["batches"] == 12  # the double's 12 batches of 2
    assert got["token_counts"] == {}  # a Linear has no routers
    assert rec["post_calibration"] == {"state": "saved"}


def test_failed_run_keeps_the_previous_export_and_says_failed(double, tmp_path, events, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU guard is inactive on a CUDA machine")
    monkeypatch.setattr(hfptq.patches, "apply", lambda force=False: [])
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"previous")

    def hook(full_model, args):
        raise RuntimeError("hook failed")

    q = {**q_for(double, tmp_path), "export_generic": True}
    with pytest.raises(RuntimeError, match="hook failed"):
        hfptq.run(q, tmp_path / "run", hook=hook)
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == b"previous"
    rec = json.loads((tmp_path / "run" / driver.RESULT).read_text())
    assert rec["status"] == "failed" and "hook failed" in rec["error"]
    hfptq.run(q, tmp_path / "run", hook=lambda **k: None)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["args.json"]


def test_gpu_guard_answers_honestly_for_another_device(double, tmp_path, events, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    monkeypatch.setattr(hfptq.patches, "apply", lambda force=False: [])
    with pytest.raises(OSError, match="GPU is required"):
        hfptq.run(q_for(double, tmp_path, device="cuda"), tmp_path / "run", hook=lambda **k: None)


def test_changed_export_signature_refused_before_main(double, tmp_path, events):
    src = (double / "hf_ptq.py").read_text().replace("default_pad_token):", "default_pad_token, extra=None):", 1)
    (double / "hf_ptq.py").write_text(src)
    with pytest.raises(ParamsError, match="export_quantized"):
        hfptq.checkout_preflight(q_for(double, tmp_path))
    assert "main" not in [e["event"] for e in events()]


# ----------------------------------------------------------------------------- the real checkout

needs_checkout = pytest.mark.skipif(
    not REAL, reason=f"${hfptq.CHECKOUT_ENV} is not set: no Model-Optimizer checkout (examples/hf_ptq) to run "
                     "hf_ptq from; e.g. git -C <Model-Optimizer clone> archive <tag> | tar -x -C /tmp/mo and "
                     f"{hfptq.CHECKOUT_ENV}=/tmp/mo/examples/hf_ptq")


def real_force() -> bool:
    """Whether the given checkout needs `force` (a dev snapshot of the installed minor does)."""
    try:
        return hfptq.version_mismatch(hfptq.checkout_version(REAL), INSTALLED) is not None
    except ParamsError:
        return True


@needs_checkout
def test_real_checkout_refuses_mismatch_and_takes_the_production_flags(tmp_path):
    from quantbook.params import load_params

    q = load_params(Path(__file__).resolve().parents[1] / "params" / "v4_pro_b200.yaml")["quantize"]
    q.update(driver="hf_ptq", hf_ptq_dir=REAL)
    if real_force():
        with pytest.raises(ParamsError) as e:
            hfptq.checkout_preflight(q)
        assert INSTALLED in str(e.value) and str(hfptq.checkout_version(REAL).text) in str(e.value)
        q["force"] = True
    with pytest.warns(UserWarning, match="mismatched") if q.get("force") else contextlib.nullcontext():
        facts = hfptq.checkout_preflight(q)  # hf_ptq's own parser and __main__ block accept every production setting
    assert "--qformat=nvfp4_experts_only" in facts["argv"] and "--use_seq_device_map" in facts["argv"]
    assert "--calib_size=64,64" in facts["argv"] and "--inference_tensor_parallel=8" in facts["argv"]
    with pytest.raises(ParamsError, match="hf_ptq has no flag --calib_sz"), \
            pytest.warns(UserWarning, match="mismatched") if q.get("force") else contextlib.nullcontext():
        hfptq.checkout_preflight({**q, "hf_ptq": {**q["hf_ptq"], "calib_sz": 128}})  # refused from the parser


def calib_jsonl(path: Path, seed: int, rows: int) -> Path:
    """Deterministic made-up text (some rows empty, lengths ragged), one {"text"} per line."""
    import random

    r = random.Random(seed)
    words = ("expert router layer token scale weight cache window sparse dense block group norm head "
             "the a of to and in is for on with as by at from").split()
    with open(path, "w") as f:
        for i in range(rows):
            n = 0 if i % 7 == 3 else r.randint(1, 60)
            f.write(json.dumps({"text": " ".join(r.choice(words) for _ in range(n))}) + "\n")
    return path


def compare_exports(a: Path, b: Path) -> list[str]:
    """Every difference between two export folders: files, and per safetensors tensor."""
    from quantbook.release.shards import read_header, read_range

    fa = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    out = [f"only in {a.name}: {n}" for n in sorted(fa - fb)] + [f"only in {b.name}: {n}" for n in sorted(fb - fa)]
    for name in sorted(fa & fb):
        ba, bb = (a / name).read_bytes(), (b / name).read_bytes()
        if ba == bb:
            continue
        if name.endswith(".safetensors"):
            ha, hb = read_header(a / name), read_header(b / name)
            for t in sorted(set(ha.tensors) | set(hb.tensors)):
                ta, tb = ha.tensors.get(t), hb.tensors.get(t)
                if ta is None or tb is None or (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
                    out.append(f"{name}: {t}: {ta and (ta.dtype, ta.shape)} vs {tb and (tb.dtype, tb.shape)}")
                elif read_range(a / name, ta.start, ta.end - ta.start) != \
                        read_range(b / name, tb.start, tb.end - tb.start):
                    out.append(f"{name}: {t} ({ta.dtype} {list(ta.shape)}): bytes differ")
            if ha.metadata != hb.metadata:
                out.append(f"{name}: header metadata {ha.metadata} vs {hb.metadata}")
            if not any(o.startswith(name + ":") for o in out):
                out.append(f"{name}: bytes differ (header layout)")
        else:
            la, lb = ba.decode(errors="replace").splitlines(), bb.decode(errors="replace").splitlines()
            diff = [f"-{x}" for x in la if x not in lb][:5] + [f"+{y}" for y in lb if y not in la][:5]
            out.append(f"{name}: differs: {diff}")
    return out


def test_compare_exports_finds_every_difference(tmp_path):
    import torch
    from safetensors.torch import save_file

    a, b = tmp_path / "a", tmp_path / "b"
    for d, x in ((a, 1.0), (b, 2.0)):
        d.mkdir()
        save_file({"same": torch.ones(4), "moved": torch.full((2,), x)}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"use_cache": x == 1.0}, indent=1))
        (d / "tokenizer.json").write_text("{}")
    (b / ".quant_summary.txt").write_text("extra")
    diffs = compare_exports(a, b)
    assert diffs[0] == "only in b: .quant_summary.txt"
    assert any("model.safetensors: moved (F32 [2]): bytes differ" in d for d in diffs)
    assert not any(": same " in d for d in diffs) and any(d.startswith("config.json: differs") for d in diffs)
    assert len(diffs) == 3


def run_driver(q: dict, run_dir: Path) -> dict:
    """`calibrate.quantize(q, run_dir)` in a fresh Python process (patches, modules and torch state
    of one driver cannot leak into the other); the run's stdout/stderr tail on failure."""
    run_dir.mkdir(parents=True)
    (run_dir / "q.json").write_text(json.dumps(q))
    code = ("import json, sys; from quantbook.calibrate import quantize; "
            "quantize(json.load(open(sys.argv[1])), sys.argv[2])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code, str(run_dir / "q.json"), str(run_dir)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{q['driver']} driver failed:\n{(r.stdout + r.stderr)[-6000:]}"
    return {"seconds": round(time.time() - t0, 1), "log": r.stdout + r.stderr}


def _devices():
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@needs_checkout
@pytest.mark.parametrize("device", _devices())
def test_both_drivers_export_identical_bytes(tiny_bf16, tmp_path, device):
    """The reference proof: hf_ptq.main() and the modelopt driver, same data and settings, same bytes.

    On CUDA, hf_ptq is first run twice: if it does not reproduce its own bytes there, the GPU
    is not deterministic for this model and the comparison proves nothing (xfail, with the diff).
    """
    data = [calib_jsonl(tmp_path / "a.jsonl", 1, 40), calib_jsonl(tmp_path / "b.jsonl", 2, 40)]
    settings = {"pyt_ckpt_path": str(tiny_bf16), "qformat": "nvfp4_experts_only", "kv_cache_qformat": "fp8_cast",
                "dataset": [str(p) for p in data], "calib_size": [16, 12], "calib_seq": 64, "batch_size": 4,
                "device": device, "skip_generate": True}
    exports, timings = {}, {}
    for name, driver_name in [("hf_ptq", "hf_ptq"), ("modelopt", "modelopt")] + \
            ([("hf_ptq-again", "hf_ptq")] if device != "cpu" else []):
        exports[name] = tmp_path / f"export-{name}"
        q = {"driver": driver_name, "hf_ptq_dir": REAL, "force": real_force(), "layerwise": False,
             "layerwise_save_every": 1, "save_full_state": False, "export_generic": True,
             "hf_ptq": {**settings, "export_path": str(exports[name])}}
        timings[name] = run_driver(q, tmp_path / f"run-{name}")["seconds"]
    if "hf_ptq-again" in exports:
        itself = compare_exports(exports["hf_ptq"], exports["hf_ptq-again"])
        if itself:
            pytest.xfail(f"hf_ptq does not reproduce its own export on {device}:\n" + "\n".join(itself[:20]))
    files = sorted(p.name for p in exports["hf_ptq"].iterdir())
    assert any(f.endswith(".safetensors") for f in files) and "hf_quant_config.json" in files
    diffs = compare_exports(exports["hf_ptq"], exports["modelopt"])
    assert diffs == [], f"exports differ (timings {timings}):\n" + "\n".join(diffs)
    rec = json.loads((tmp_path / "run-hf_ptq" / driver.RESULT).read_text())
    assert rec["status"] == "done" and rec["post_calibration"]["state"]["quantizers"] > 0
    if device == "cpu" and not __import__("torch").cuda.is_available():
        assert rec["cpu_rehearsal_guard_lines"]  # main ran past its GPU guard on this CPU-only machine
    # the post-calibration hook saw the same calibration in both: amax, data, experts reached, config
    from quantbook.amax import load_snapshot

    snaps = [load_snapshot(tmp_path / f"run-{d}" / "amax.safetensors")[0] for d in ("hf_ptq", "modelopt")]
    assert sorted(snaps[0]) == sorted(snaps[1]) and all(snaps[0][k].equal(snaps[1][k]) for k in snaps[0])
    runs = [tmp_path / f"run-{d}" for d in ("hf_ptq", "modelopt")]
    counts = [json.loads((r / "expert_token_counts.json").read_text()) for r in runs]
    assert counts[0] == counts[1] and len(counts[0]) == 4
    manifests = [json.loads((r / "state" / "manifest.json").read_text()) for r in runs]
    for key in ("calibration", "quant_cfg_sha256", "quantizers", "quantizer_tensors", "model"):
        assert manifests[0][key] == manifests[1][key] and manifests[0][key], key
    assert manifests[0]["calibration"]["samples"] == 24  # 16 + 12 rows drawn, 4 of them empty and dropped
