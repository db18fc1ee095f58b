"""Step 03: the export engines serve, built from what step 02 kept, and proven right.

`layout` (the v4-serving layout from the release plus calibrated amax, no model loaded),
`recover` (export from a run's snapshot or state, `--validate-only`), `verify` (the checklist and
the numeric bound; `quantbook verify`).
"""
