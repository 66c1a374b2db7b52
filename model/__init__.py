"""The served model: the VGG feature extractor, where its weights come from, the artifact and its
manifest, and torch/ONNX Runtime parity. The export CLI writes it; the server runtime reads it."""
