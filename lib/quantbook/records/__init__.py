"""Run records and step 04: what a run leaves for people to read.

`runs` (the papermill chain runner and `manifest.json`), `step` (a step's JSON record and timed
phases), `memory` (`memory.csv`, host and GPU memory over time), `inspect_amax` (notebook 04's
analysis and figures, read from the amax snapshot alone), `inspect_export` (the export's scales and
re-quantized blocks, read through headers and the tensors shown), `explorer` (interactive figures
for JupyterLab that leave a figure in the record), `lab` (`quantbook lab RUN`: a run opened in
JupyterLab).
"""
