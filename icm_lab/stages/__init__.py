"""The stages, in the order of the data flow: collect, localize, [causal,] steer, evaluate. Each
is a function of the shared resources, its own config section and its upstream results, and
its module registers it (`registry.py`); the runner (`icm_lab/app/runner.py`) runs the graph."""
