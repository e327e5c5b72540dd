"""The toy world: a procedurally drawn 32 px world whose implicit choices are known exactly,
its oracle, and the shipped model trained on it."""
