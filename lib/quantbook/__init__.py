"""quantbook: DeepSeek V4 to NVFP4 with NVIDIA Model Optimizer, rehearsed, resumable, verified.

One package per step of the chain, each the code its notebook calls:

    release/    step 01: the released format (tensor table, name grammar), safetensors I/O,
                exact FP8/FP4 dequantization, the resumable converter, tiny checkpoints
    calibrate/  step 02: drivers by name (registry: modelopt, hf_ptq, streaming from the release),
                settings and refusals, runtime patches, the amax snapshot and cheap calibrated state,
                calibration data
    export/     step 03: the v4-serving layout, recovery from a run's saved state, the verifier
    records/    runs and step 04: the chain runner, run records, memory timeline, amax inspection

Shared by all: `errors` (one base, `QuantbookError`), `atomic` (files and directories written
whole), `params` (one YAML file per target), `amax` (the snapshot file, quantizer names).
"""
