"""Calibration: the text it runs on, what it consumed, and which experts it reached.

Data. Calibration reads local JSONL files (one `{"text": ...}` object a line), so a run needs no
network; hub dataset names still work when the machine is online. The embedded default is real
English text taken at set-up from a package on PyPI, never committed to this repository:

- `brotli` (sdist of brotli==1.2.1): the Canterbury corpus texts in `tests/testdata`, public
  domain: Alice in Wonderland, As You Like It, Paradise Lost, and a technical lecture.
- `gensim` (wheel of gensim==4.4.0): a shortened English Wikipedia XML dump in
  `gensim/test/test_data`, markup stripped here.

`write_calib_jsonl` downloads the package with `pip download --no-deps` into a temporary
directory, extracts paragraphs, groups them into samples of about `chunk_chars` characters and
writes the JSONL atomically. An existing file is left alone, so set-up can run offline later.
Every 8th sample (index % 8 == 7, in chunking order) is held out: it goes to the sibling file
`<stem>-heldout.jsonl` (`heldout_path`) and not into the calibration file, so quality numbers
(perplexity, the trained tiny's training) can be measured on text nothing was fitted to.

Consumption. `describe_dataloader` counts samples, tokens and a digest of the exact token ids a
run calibrated on (the layerwise resume signature uses it).

Coverage. `ExpertTokenCounter` hooks every MoE router and counts, per layer and expert, the
token positions routed there while that layer's quantizers were calibrating (padding positions
included: the experts compute them too). Layerwise calibration replays layers several times; the
calibrating-only rule counts each layer once. With `persist_dir` the counts of each layer are
kept on disk after every batch, so a resumed layerwise run still reports the layers finished
before the interruption.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .. import atomic
from ..errors import CalibDataError

SOURCES = {
    "brotli": {"requirement": "brotli==1.2.1", "kind": "sdist",
               "files": ["tests/testdata/alice29.txt", "tests/testdata/asyoulik.txt",
                         "tests/testdata/plrabn12.txt", "tests/testdata/lcet10.txt"],
               "license": "public domain (Canterbury corpus texts)"},
    "gensim": {"requirement": "gensim==4.4.0", "kind": "wheel",
               "files": ["gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"],
               "license": "CC BY-SA (Wikipedia text)"},
}
DEFAULT_CHUNK_CHARS = 2000
HELDOUT_EVERY = 8  # sample i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY - 1


# ---------------------------------------------------------------------------------------------
# text sources

def download_package(requirement: str, kind: str, dest: Path) -> Path:
    """`pip download --no-deps` one pinned package (sdist or wheel) into `dest`; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), requirement]
    cmd += ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise CalibDataError(f"pip download {requirement} failed (offline? set up the calibration file "
                             f"on a machine with PyPI access):\n{r.stderr[-2000:]}")
    got = sorted(p for p in dest.iterdir() if p.is_file())
    if not got:
        raise CalibDataError(f"pip download {requirement} wrote nothing into {dest}")
    return got[0]


def _read_member(archive: Path, suffix: str) -> bytes:
    """The bytes of the member whose path ends with `suffix` in a .tar.gz or a wheel."""
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.endswith("/" + suffix):
                    return t.extractfile(m).read()
    else:
        with zipfile.ZipFile(archive) as z:
            for n in z.namelist():
                if n == suffix or n.endswith("/" + suffix):
                    return z.read(n)
    raise CalibDataError(f"{suffix} not found in {archive.name}")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with whitespace collapsed; empty ones dropped."""
    out = []
    for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        p = re.sub(r"\s+", " ", p).strip()
        if p:
            out.append(p)
    return out


_WIKI_DROP = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),                       # tables
    (re.compile(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),        # [[target|label]] -> label
    (re.compile(r"\[https?://[^\s\]]+\s*([^\]]*)\]"), r"\1"),      # [url label] -> label
    (re.compile(r"<[^>]+>"), ""),                                  # html tags
    (re.compile(r"'{2,}"), ""),                                    # bold / italic
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),            # headings
    (re.compile(r"^[*#:;]+\s*", re.M), ""),                        # list markers
    (re.compile(r"&nbsp;|&ndash;|&mdash;"), " "),
]


def strip_wiki_markup(text: str) -> str:
    """MediaWiki source -> plain text (templates, tables, refs, files, categories removed)."""
    import html

    text = html.unescape(text)
    for _ in range(8):  # nested templates, innermost first
        new = re.sub(r"\{\{[^{}]*\}\}", "", text)
        if new == text:
            break
        text = new
    for pattern, repl in _WIKI_DROP:
        text = pattern.sub(repl, text)
    return text


def wiki_articles(xml_bytes: bytes) -> list[str]:
    """Plain text of every main-namespace, non-redirect page of a MediaWiki XML dump."""
    import xml.etree.ElementTree as ET

    out = []
    for _, el in ET.iterparse(io.BytesIO(xml_bytes), events=("end",)):
        if not el.tag.endswith("}page") and el.tag != "page":
            continue
        ns = next((c.text for c in el if c.tag.endswith("ns")), "0")
        redirect = any(c.tag.endswith("redirect") for c in el)
        text = ""
        for c in el.iter():
            if c.tag.endswith("text"):
                text = c.text or ""
        if ns == "0" and not redirect and not text.lstrip().lower().startswith("#redirect"):
            out.append(strip_wiki_markup(text))
        el.clear()
    return out


def source_texts(source: str, archive: Path) -> list[str]:
    """The documents of a source package, as plain text."""
    spec = SOURCES[source]
    docs = []
    for member in spec["files"]:
        raw = _read_member(archive, member)
        if member.endswith(".bz2"):
            docs.extend(wiki_articles(bz2.decompress(raw)))
        else:
            docs.append(raw.decode("latin-1"))
    return docs


def chunk(docs: list[str], chunk_chars: int = DEFAULT_CHUNK_CHARS, min_chars: int = 200) -> list[str]:
    """Consecutive paragraphs of each document joined into samples of about `chunk_chars`."""
    samples = []
    for doc in docs:
        cur: list[str] = []
        size = 0
        for p in paragraphs(doc):
            size += len(p) + (1 if cur else 0)  # the joining newline
            cur.append(p)
            if size >= chunk_chars:
                samples.append("\n".join(cur))
                cur, size = [], 0
        if cur and size >= min_chars:
            samples.append("\n".join(cur))
    return samples


def heldout_path(calib_path: str | Path) -> Path:
    """The held-out sibling of a calibration file: `work/calib/english.jsonl` -> `english-heldout.jsonl`."""
    p = Path(calib_path)
    return p.with_name(f"{p.stem}-heldout{p.suffix or '.jsonl'}")


def split_heldout(samples: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, held-out): sample i is held out when i % 8 == 7; order is kept in both."""
    keep = [s for i, s in enumerate(samples) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [s for i, s in enumerate(samples) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return keep, held


def _read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]


def write_calib_jsonl(out: str | Path, source: str = "brotli", chunk_chars: int = DEFAULT_CHUNK_CHARS,
                      archive: str | Path | None = None, force: bool = False) -> dict:
    """Write calibration samples `{"text": ...}` to `out` and the held-out ones (every 8th sample)
    to `heldout_path(out)`, each atomically. Skips when both files exist; a calibration file without
    its held-out sibling (written before the split) is rewritten with it.

    `archive` uses an already downloaded sdist/wheel instead of calling pip (for offline set-up).
    Returns {"path", "samples", "chars", "heldout_path", "heldout", "source", "skipped"}.
    """
    out = Path(out)
    held_out = heldout_path(out)
    if source not in SOURCES:
        raise CalibDataError(f"unknown calibration source {source!r}; known: {sorted(SOURCES)}")
    if out.exists() and held_out.exists() and not force:
        texts = _read_texts(out)
        return {"path": str(out), "samples": len(texts), "chars": sum(map(len, texts)),
                "heldout_path": str(held_out), "heldout": len(_read_texts(held_out)), "source": source,
                "skipped": True}
    spec = SOURCES[source]
    with tempfile.TemporaryDirectory(prefix="quantbook-calib-") as tmp:
        pkg = Path(archive) if archive else download_package(spec["requirement"], spec["kind"], Path(tmp))
        samples = chunk(source_texts(source, pkg), chunk_chars)
    if not samples:
        raise CalibDataError(f"no text extracted from {spec['requirement']}")
    keep, held = split_heldout(samples)

    def body(texts):
        return "".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in texts)

    # Both written to temporary files first; the calibration file is renamed into place before the
    # held-out one, so a crash in between leaves the held-out file missing (rewritten next time),
    # never a new held-out file beside an old calibration file that still holds its samples.
    with atomic.atomic_path(held_out) as tmp_held, atomic.atomic_path(out) as tmp_out:  # inner renamed first
        Path(tmp_out).write_text(body(keep), encoding="utf-8")
        Path(tmp_held).write_text(body(held), encoding="utf-8")
        if held_out.exists():  # a stale held-out file must not outlive the new calibration file
            held_out.unlink()
    return {"path": str(out), "samples": len(keep), "chars": sum(map(len, keep)), "heldout_path": str(held_out),
            "heldout": len(held), "source": source, "requirement": spec["requirement"], "license": spec["license"],
            "skipped": False}


def count_samples(path: str | Path) -> int:
    """Samples a JSONL calibration file holds: its non-empty lines, as modelopt's reader counts them."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def modelopt_datasets() -> tuple[dict[str, str], dict[str, list[str]]]:
    """modelopt's dataset names -> hub repositories, and its combos -> member names, read from the
    source of the installed `modelopt/torch/utils/dataset_utils.py` (importing modelopt.torch takes
    ~10 s; the preflight has seconds). Empty when modelopt is not installed."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("modelopt")
    roots = list(spec.submodule_search_locations or []) if spec else []
    files = [Path(r) / "torch" / "utils" / "dataset_utils.py" for r in roots]
    files = [f for f in files if f.is_file()]
    if not files:
        return {}, {}
    repos, combos = {}, {}
    for node in ast.parse(files[0].read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                      else None)
        if not isinstance(target, ast.Name) or not isinstance(node.value, ast.Dict):
            continue
        for k, v in zip(node.value.keys, node.value.values):
            if not isinstance(k, ast.Constant):
                continue
            if target.id == "DATASET_COMBOS" and isinstance(v, ast.List):
                combos[k.value] = [e.value for e in v.elts if isinstance(e, ast.Constant)]
            elif target.id == "SUPPORTED_DATASET_CONFIG" and isinstance(v, ast.Dict):
                for ck, cv in zip(v.keys, v.values):
                    if isinstance(ck, ast.Constant) and ck.value == "config" and isinstance(cv, ast.Dict):
                        for pk, pv in zip(cv.keys, cv.values):
                            if isinstance(pk, ast.Constant) and pk.value == "path" and isinstance(pv, ast.Constant):
                                repos[k.value] = pv.value
    return repos, combos


def hub_cache_dirs(name: str) -> list[tuple[str, Path]]:
    """(hub repository, its folder in the local Hugging Face cache) for each dataset a name stands
    for in modelopt (`cnn_dailymail` -> abisee/cnn_dailymail; a combo such as cnn_nemotron_v2_mix
    -> its members), or for a hub repository named directly."""
    from huggingface_hub import constants

    repos, combos = modelopt_datasets()
    out = []
    for member in combos.get(name, [name]):
        repo = repos.get(member, member)
        out.append((repo, Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"))
    return out


# ---------------------------------------------------------------------------------------------
# what a run calibrated on

def describe_dataloader(dataloader) -> dict:
    """Samples, real tokens, padded positions, batches and a sha256 of the exact batches."""
    import torch

    h = hashlib.sha256()
    samples = tokens = positions = batches = 0
    for batch in dataloader:
        batches += 1
        for key in sorted(batch):
            t = batch[key]
            if isinstance(t, torch.Tensor):
                h.update(key.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
        ids = batch["input_ids"]
        samples += ids.shape[0]
        positions += ids.numel()
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else ids.numel()
    return {"samples": samples, "tokens": tokens, "positions": positions, "batches": batches,
            "sha256": h.hexdigest()}


# ---------------------------------------------------------------------------------------------
# expert coverage

_GATE = re.compile(r"^(?:model\.)?(layers|mtp)\.(\d+)\.mlp\.gate$")


def _calibrating(experts) -> bool:
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import TensorQuantizer

    qs = [m for m in experts.modules() if isinstance(m, TensorQuantizer)]
    return any(getattr(q, "_if_calib", False) for q in qs)


class ExpertTokenCounter:
    """Per MoE layer, the token positions each routed expert received during calibration.

    Install BEFORE calibration (the hf_ptq driver: right after the model loads); `counts` maps
    `layers.<i>` to a list with one count per expert. `remove()` detaches the hooks.
    """

    def __init__(self, model, persist_dir: str | Path | None = None, keep_layers_below: int = 0):
        import torch

        self.counts: dict[str, "torch.Tensor"] = {}
        self.persist_dir = Path(persist_dir) if persist_dir else None
        self._handles = []
        blocks = dict(model.named_modules())
        for name, module in model.named_modules():
            m = _GATE.match(name)
            if not m or not hasattr(module, "num_experts"):
                continue
            key = f"{m.group(1)}.{int(m.group(2))}"
            block = blocks[name.rsplit(".", 1)[0]]
            self._handles.append(module.register_forward_hook(self._hook(key, block, module.num_experts)))
        if self.persist_dir:
            self.persist_dir.mkdir(parents=True, exist_ok=True)
            for f in self.persist_dir.glob("*.json"):
                key = f.stem
                layer = int(key.split(".")[1])
                if key.startswith("layers.") and layer < keep_layers_below:
                    self.counts[key] = torch.tensor(json.loads(f.read_text()), dtype=torch.long)
                else:
                    f.unlink()

    def _hook(self, key: str, block, num_experts: int):
        import torch

        def hook(module, args, output):
            if not (isinstance(output, tuple) and len(output) >= 3):
                return
            experts = getattr(block, "experts", None)
            if experts is None or not _calibrating(experts):
                return
            idx = output[2].detach().reshape(-1).to("cpu", torch.long)
            c = torch.bincount(idx, minlength=num_experts)[:num_experts]
            self.counts[key] = self.counts.get(key, torch.zeros(num_experts, dtype=torch.long)) + c
            if self.persist_dir:
                self._persist(key)
        return hook

    def _persist(self, key: str) -> None:
        path = self.persist_dir / f"{key}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.counts[key].tolist()))
        os.replace(tmp, path)  # rename only: survives a killed process, which is what resume is for

    def as_dict(self) -> dict[str, list[int]]:
        def order(k):
            kind, i = k.split(".")
            return (kind != "layers", int(i))
        return {k: self.counts[k].tolist() for k in sorted(self.counts, key=order)}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def coverage(counts: dict[str, list[int]]) -> dict:
    """Summary of expert token counts: layers, experts never routed (listed), min/max per layer."""
    never = {k: [j for j, c in enumerate(v) if c == 0] for k, v in counts.items()}
    return {
        "layers": len(counts),
        "experts_never_routed": sum(len(v) for v in never.values()),
        "never_routed": {k: v for k, v in never.items() if v},
        "per_layer": {k: {"min": min(v), "max": max(v), "total": sum(v)} for k, v in counts.items() if v},
    }
