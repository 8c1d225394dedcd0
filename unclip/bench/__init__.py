"""The benchmark suite behind `unclip bench`: every backend against diffusers' UnCLIPPipeline.

Why a package of its own under unclip/: the CLI imports it, so it must be installed with
unclip; it is neither runtime (engine/) nor export. The timing hooks it uses are runtime
concerns and live in unclip.engine.profiling; the repository's benchmarks/ folder holds only
suite definitions and committed results, as DESIGN.md says.

  config.py     what a run measures (BenchConfig), input checks, suite files
  suite.py      the parent: export, worker processes, interleaved rounds, progress, Ctrl-C
  worker.py     one runner (baseline or a backend) in its own process
  baseline.py   diffusers' UnCLIPPipeline over the same networks, with call hooks
  artifacts.py  exports (cached) for backends that load from one
  results.py    raw samples -> results.json figures
  report.py     results.md;  plots.py: the PNG plots;  machine.py: machine and versions
"""
