"""Helpers for the step-02 tests: calibration text written for these tests, settings, comparisons."""

from __future__ import annotations

import json
from pathlib import Path

# Original text written for the tests (no third-party text is committed).
CALIB_TEXT = [
    "The lighthouse keeper counted the ships each evening and wrote their names in a narrow book.",
    "A quiet river ran past the mill, turning the wheel that ground the village's winter flour.",
    "",
    "Engineers measured the bridge twice before the storm season and found it had settled by a finger's width.",
    "She kept a garden of herbs on the roof: thyme, rosemary, two kinds of mint and a stubborn bay tree.",
    "Numbers like 3.14159, 2.71828 and 1.41421 appear in places nobody expected them to.",
    "The train left at seven minutes past six, and the conductor punched every ticket with a small brass tool.",
    "When the library reopened, the children ran straight to the atlas and argued about the longest river.",
    "Bread rises because yeast turns sugar into gas; the dough traps the bubbles and the oven sets them.",
    "The committee agreed on one thing only: the meeting should end before lunch.",
    "Far to the north the snow stays until June, and the roads are marked with tall poles painted red.",
    "He repaired clocks for forty years and could tell a worn gear by the sound it made.",
    "def add(a, b):\n    return a + b  # a line of code among the prose",
    "Rain fell on the tin roof all night, and by morning the creek had climbed over the stepping stones.",
    "The recipe asked for a pinch of salt, which every cook in the family measured differently.",
    "Maps from the old survey show a road that no longer exists, ending at a farm that burned long ago.",
    "Astronomers waited for a clear sky; the comet would pass only once in their lifetimes.",
    "The orchestra tuned to a single note from the oboe before the conductor raised her hands.",
    "A ledger of the harbour shows wool, salt and timber leaving, and tea, sugar and iron arriving.",
    "The cat slept in the one square of sunlight that crossed the kitchen floor each afternoon.",
    "Every spring the swallows returned to the same barn and rebuilt the nests under the same beam.",
    "Tables, chairs and a long bench filled the hall; the wedding guests would arrive at noon.",
    "Good questions are rarer than good answers, the teacher said, and wrote one on the board.",
    "The signal travelled through forty kilometres of cable and arrived a few milliseconds later.",
]


# Original held-out text for the fidelity gate (never a calibration sample; no third-party text committed).
HELDOUT_TEXT = [
    "The ferry crossed the bay twice a day, and on calm mornings the passengers could see the bottom of the "
    "harbour through the green water. Gulls followed the boat for the bread the children threw them.",
    "In the workshop the carpenter marked each board with a pencil, measured it again, and only then reached for "
    "the saw. His apprentice learned more from watching his hands than from anything he said.",
    "The old road climbed through the forest in long loops, past a spring where travellers stopped to drink and "
    "a stone bench that someone had carved with the date of a wedding a hundred years before.",
    "When the power failed, the whole street came out with candles and lanterns, and for one evening the "
    "neighbours talked to each other as if they had only just met.",
    "She wrote the letter three times before she was satisfied, folded it twice, and walked to the post office "
    "in the rain rather than wait another day to send it.",
    "The market opened before dawn: fish on ice, apples in wooden crates, bread still warm from the ovens, and a "
    "man who sold nothing but buttons of every colour and size.",
    "A small boat with a red sail tacked back and forth across the river mouth, waiting for the tide to turn so "
    "that it could slip out to sea without fighting the current.",
    "The museum kept its oldest clock in a glass case. It had not run for decades, but the curator wound it once "
    "a year, just to hear whether it would still tick for a minute or two.",
    "By the end of the summer the field was gold, and the farmers watched the sky each evening, hoping the rain "
    "would hold off until the harvest was in the barns.",
    "The students argued late into the night about whether a perfect map would have to be as large as the land it "
    "described, and whether anyone could ever fold it.",
    "At the top of the tower a narrow window looked out over the town, the river, the hills beyond, and on a clear "
    "day the faint grey line of the mountains far to the east.",
    "The baker rose at three each morning. By six the shelves were full, by noon they were half empty, and by the "
    "time the school bell rang in the afternoon there was nothing left but crumbs.",
]


def write_calib(path: Path, lines: list[str] = CALIB_TEXT, heldout: list[str] = HELDOUT_TEXT) -> Path:
    """The calibration JSONL at `path` and, beside it, the held-out file the fidelity gate reads."""
    from quantbook.calibrate.data import heldout_path

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    heldout_path(path).write_text("".join(json.dumps({"text": t}) + "\n" for t in heldout))
    return path


def tiny_q(bf16: Path, export: Path, calib: Path, **over) -> dict:
    """A `quantize:` section for the tiny model, like params/tiny.yaml's."""
    hf = dict(pyt_ckpt_path=str(bf16), export_path=str(export), qformat="nvfp4_experts_only",
              kv_cache_qformat="fp8_cast", dataset=str(calib), calib_size=16, calib_seq=48, batch_size=4,
              device="cpu", skip_generate=True)
    hf.update(over.pop("hf_ptq", {}))
    return {"driver": "modelopt", **over, "hf_ptq": hf}


def dir_bytes(d: Path) -> dict[str, bytes]:
    """Every file of a directory tree (hidden ones included) -> its bytes."""
    d = Path(d)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def assert_same_files(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Both directories hold the same file names with the same bytes; the names compared."""
    fa = {k: v for k, v in dir_bytes(a).items() if k not in ignore}
    fb = {k: v for k, v in dir_bytes(b).items() if k not in ignore}
    assert sorted(fa) == sorted(fb), f"file lists differ: {sorted(set(fa) ^ set(fb))}"
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, f"files differ in bytes: {differ}"
    return sorted(fa)
