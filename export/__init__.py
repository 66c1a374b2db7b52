"""`stylize-export`: the model (stylize.model) exported to the ONNX artifact and its manifest."""
