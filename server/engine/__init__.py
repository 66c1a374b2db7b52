"""Pure-torch style-transfer engine: features, losses, optimization loop. Knows nothing of gRPC."""
