"""Stage 1, in and out of the tool: loading the user's model (:mod:`.loading`, optional libraries in
:mod:`.extras`), adapting it to the shard (:mod:`.adapters`), the task a shard asks for (:mod:`.tasks`),
arrays as tensors and ONNX feeds (:mod:`.feeds`), the dense ONNX export (:mod:`.export`), and writing outputs
atomically (:mod:`.outputs`, :mod:`.saving`)."""
