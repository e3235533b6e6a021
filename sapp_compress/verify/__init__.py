"""Stage 5, checks on the written artifact: ONNX Runtime against the pruned PyTorch model, stage by stage
(:mod:`.stages`, exit 3), and the accuracy gate (:mod:`.gate`, exit 4)."""
