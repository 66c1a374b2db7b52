"""VGG feature extractor, its export to the ONNX artifact, and the artifact reader."""
