"""Benchmarks of fbp-kernels against the pure-PyTorch baseline (see README.md here).

``python benchmarks/run.py`` is the main job (``make bench``); ``pytest benchmarks
--benchmark-only`` is the regression-tracking suite.  The modules:

- ``problems``    the shapes: one problem, the named sweeps, the CPU/GPU/smoke plans
- ``providers``   what is measured: baseline, torch.compile, each backend, the floor
- ``harness``     the loop over problems, providers and modes; failures become rows
- ``measure``     how: time percentiles, GPU peak memory, saved-activation bytes
- ``environment`` the device and versions every row is tagged with
- ``results``     the machine-readable rows (CSV and JSON)
- ``table``       looking rows up: speedup, time over floor, memory ratios
- ``targets``     the issue's performance targets checked against a run
- ``summary``     the terminal table and the markdown summary
- ``plots``       PNG plots against the swept dimension
"""
