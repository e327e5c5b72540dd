"""Developer tools off the run path: benchmarks and training the toy world. Nothing on the run
path imports them."""
