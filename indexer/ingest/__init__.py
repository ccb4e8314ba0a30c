"""The write side: `plan` (disk vs store), `embed` (batches → vectors on the model's thread), `writer`
(the background writer), `pipeline` (the loop that wires a source, the decoders, the model and a sink).
"""
