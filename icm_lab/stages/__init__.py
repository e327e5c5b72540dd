"""The stages, in the order of the data flow: collect, localize, steer, evaluate. Each is a
function of the shared resources, its own config section and its upstream results; the runner
(`icm_lab/app/runner.py`) owns the graph."""
