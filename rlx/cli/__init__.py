"""rlx's commands: train, evaluate, sample, export.

Each module here is one command: its absl flags, a `main(argv)` and a
`run()` that is the package's console entry point (`rlx-train`,
`rlx-evaluate`, `rlx-sample`, `rlx-export`; see setup.cfg). The scripts in
scripts/ of a clone call the same `run()`. What every command shares
(reading a recipe and its overrides, the quiet console, one-line errors) is
in `rlx.cli.launch`.
"""
