"""The held-out split of the calibration text: every 8th sample goes to `<stem>-heldout.jsonl`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from quantbook.calibrate import data as calib
from quantbook.cli import main

# distinct paragraphs, so that every chunk is unique and the union can be checked as a set
BOOK = "\n\n".join(f"Paragraph {i}: the {i}th line of a book that tests the split, word {i * 7 % 13}."
                   for i in range(400))


def _sdist(path: Path, text: str = BOOK) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for k, name in enumerate(calib.SOURCES["brotli"]["files"]):
            data = text.replace("Paragraph", f"Document {k}, paragraph").encode("latin-1")
            info = tarfile.TarInfo(f"brotli-1.2.1/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_heldout_path():
    assert calib.heldout_path("work/calib/english.jsonl") == Path("work/calib/english-heldout.jsonl")
    assert calib.heldout_path(Path("/x/y/wiki.jsonl")) == Path("/x/y/wiki-heldout.jsonl")


def test_split_of_chunks_is_every_eighth():
    samples = calib.chunk([BOOK], chunk_chars=300)
    assert len(samples) > 40
    keep, held = calib.split_heldout(samples)
    assert held == samples[7::8]
    assert keep == [s for i, s in enumerate(samples) if i % 8 != 7]
    assert not set(keep) & set(held) and sorted(keep + held) == sorted(samples)


def test_write_both_files_disjoint_and_deterministic(tmp_path):
    archive = _sdist(tmp_path / "b.tar.gz")
    out = tmp_path / "c" / "english.jsonl"
    r = calib.write_calib_jsonl(out, "brotli", chunk_chars=500, archive=archive)
    held_out = calib.heldout_path(out)
    keep, held = _texts(out), _texts(held_out)
    expected = calib.chunk(calib.source_texts("brotli", archive), 500)
    assert r["samples"] == len(keep) and r["heldout"] == len(held) > 5 and r["heldout_path"] == str(held_out)
    assert not set(keep) & set(held)
    assert sorted(keep + held) == sorted(expected) and held == expected[7::8]
    first = (out.read_bytes(), held_out.read_bytes())

    # both exist: skipped, nothing downloaded (the archive does not exist)
    again = calib.write_calib_jsonl(out, "brotli", chunk_chars=500, archive=tmp_path / "missing.tar.gz")
    assert again["skipped"] and again["heldout"] == len(held) and again["samples"] == len(keep)

    # forced: the same bytes again (deterministic)
    calib.write_calib_jsonl(out, "brotli", chunk_chars=500, archive=archive, force=True)
    assert (out.read_bytes(), held_out.read_bytes()) == first

    # a calibration file written before the split (every sample, no held-out sibling): both rewritten
    out.write_text("".join(json.dumps({"text": s}) + "\n" for s in expected))
    held_out.unlink()
    r = calib.write_calib_jsonl(out, "brotli", chunk_chars=500, archive=archive)
    assert not r["skipped"] and (out.read_bytes(), held_out.read_bytes()) == first


def test_cli_prints_heldout_count(tmp_path, capsys):
    out = tmp_path / "e.jsonl"
    assert main(["calib-data", str(out), "--chunk-chars", "500", "--archive", str(_sdist(tmp_path / "b.tar.gz"))]) == 0
    held = len(_texts(calib.heldout_path(out)))
    assert f"{held} held out" in capsys.readouterr().out and held > 0
