"""Domain primitives with no model behind them: errors, concepts, the layer registry, layer
selection."""
