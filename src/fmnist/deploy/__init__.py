"""Stage 6, using a trained model: the Classifier (a run folder or an exported ONNX file),
the export with its parity check, and the web service with its page. The ONNX path never
imports PyTorch."""
