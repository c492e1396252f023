"""The benchmarks, run from the repository root as modules: `python -m bench.fce`,
`python -m bench.mcmc`, `python -m bench.mcmc_images`, `python -m bench.vi`,
`python -m bench.tilt`; `python -m bench.gather` tabulates finished runs. bench/runner.py names,
runs and times their training runs; bench/gather.py writes their tables."""
