"""Calibration text: extraction, chunking, the JSONL writer and the CLI; the dataloader digest."""

from __future__ import annotations

import bz2
import io
import json
import os
import tarfile
import zipfile
from xml.sax.saxutils import escape

import pytest

from quantbook.calibrate import data as calib
from quantbook.cli import main

BOOK = (
    "THE LITTLE BOOK OF TESTS\n\n"
    "Chapter One\n\n"
    "It was a bright morning and the\nfirst paragraph ran over two lines.\n\n"
    + "\n\n".join(f"Paragraph {i} says something about the number {i} and the word test." for i in range(40))
)
ARTICLE = """{{Infobox thing|name=Teapot|colour={{nowrap|brown}}}}
A '''teapot''' is a vessel for [[tea|brewing tea]].<ref>A book, p. 3</ref> It has a [[spout]].

== History ==
Teapots were used in [[China]] long ago.<ref name="x"/> Modern ones are made of porcelain, glass,
iron or silver, and a good one keeps the tea warm for most of an hour on a cold afternoon.
{| class="wikitable"
| a || b
|}
[[File:Teapot.jpg|thumb|A teapot]]
* one item
[[Category:Vessels]]"""
WIKI = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Teapot</title><ns>0</ns><revision><text>{escape(ARTICLE)}</text></revision></page>
<page><title>Tea pot</title><ns>0</ns><redirect title="Teapot"/><revision><text>#REDIRECT [[Teapot]]</text></revision></page>
<page><title>Talk:Teapot</title><ns>1</ns><revision><text>A talk page.</text></revision></page>
</mediawiki>"""


def _fake_sdist(path):
    with tarfile.open(path, "w:gz") as t:
        for name in calib.SOURCES["brotli"]["files"]:
            data = BOOK.encode("latin-1")
            info = tarfile.TarInfo(f"brotli-1.2.1/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _fake_wheel(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(calib.SOURCES["gensim"]["files"][0], bz2.compress(WIKI.encode()))
    return path


def test_paragraphs_and_chunks():
    ps = calib.paragraphs(BOOK)
    assert ps[2] == "It was a bright morning and the first paragraph ran over two lines."
    chunks = calib.chunk([BOOK], chunk_chars=300)
    assert all(len(c) >= 300 for c in chunks[:-1]) and len(chunks) > 5
    assert "\n".join(chunks).count("Paragraph 7 ") == 1


def test_wiki_markup_stripped():
    arts = calib.wiki_articles(WIKI.encode())
    assert len(arts) == 1  # the redirect and the talk page are dropped
    text = arts[0]
    assert "A teapot is a vessel for brewing tea. It has a spout." in text
    assert "Teapots were used in China long ago." in text
    for junk in ("{{", "}}", "[[", "<ref", "wikitable", "Category:", "File:", "'''", "=="):
        assert junk not in text, junk


def test_write_jsonl_from_archives_and_skip(tmp_path):
    out = tmp_path / "c" / "english.jsonl"
    r = calib.write_calib_jsonl(out, "brotli", chunk_chars=500, archive=_fake_sdist(tmp_path / "b.tar.gz"))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert r["samples"] == len(lines) > 4 and not r["skipped"] and all(set(x) == {"text"} for x in lines)
    before = out.read_bytes()
    again = calib.write_calib_jsonl(out, "brotli", archive=tmp_path / "no-such-archive")  # offline: skipped
    assert again["skipped"] and again["samples"] == len(lines) and out.read_bytes() == before
    w = calib.write_calib_jsonl(tmp_path / "wiki.jsonl", "gensim", archive=_fake_wheel(tmp_path / "g.whl"))
    assert w["samples"] == 1 and "brewing tea" in json.loads((tmp_path / "wiki.jsonl").read_text())["text"]
    with pytest.raises(calib.CalibDataError, match="unknown"):
        calib.write_calib_jsonl(tmp_path / "x.jsonl", "nope")


def test_cli_calib_data(tmp_path, capsys):
    out = tmp_path / "e.jsonl"
    assert main(["calib-data", str(out), "--archive", str(_fake_sdist(tmp_path / "b.tar.gz"))]) == 0
    assert "written from brotli==1.2.1" in capsys.readouterr().out
    assert main(["calib-data", str(out)]) == 0  # exists: no download attempted
    assert "left as is" in capsys.readouterr().out


@pytest.mark.skipif(os.environ.get("QUANTBOOK_NET_TESTS") != "1", reason="downloads from PyPI (QUANTBOOK_NET_TESTS=1)")
@pytest.mark.parametrize("source", ["brotli", "gensim"])
def test_real_package_download(tmp_path, source):
    r = calib.write_calib_jsonl(tmp_path / f"{source}.jsonl", source)
    assert r["samples"] > 100 and r["chars"] > 500_000


def test_describe_dataloader_digest():
    import torch

    def loader(ids):
        return [{"input_ids": torch.tensor(ids), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}]

    a = calib.describe_dataloader(loader([[1, 2, 3], [4, 5, 6]]))
    assert a["samples"] == 2 and a["tokens"] == 5 and a["positions"] == 6 and a["batches"] == 1
    assert calib.describe_dataloader(loader([[1, 2, 3], [4, 5, 6]]))["sha256"] == a["sha256"]
    assert calib.describe_dataloader(loader([[1, 2, 3], [4, 5, 7]]))["sha256"] != a["sha256"]


def test_coverage_lists_never_routed():
    c = calib.coverage({"layers.0": [3, 0, 5], "layers.1": [1, 1, 1]})
    assert c["experts_never_routed"] == 1 and c["never_routed"] == {"layers.0": [1]}
    assert c["per_layer"]["layers.0"] == {"min": 0, "max": 5, "total": 8}
