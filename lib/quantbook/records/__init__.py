"""Run records and step 04: what a run leaves for people to read.

`runs` (the papermill chain runner and `manifest.json`), `step` (a step's JSON record and timed
phases), `memory` (`memory.csv`, host and GPU memory over time), `inspect_amax` (notebook 04's
analysis and figures, read from the amax snapshot alone).
"""
