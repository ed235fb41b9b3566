"""The device side: ONNX Runtime sessions, decoding with the KV cache, text generation (`generate.py`,
encoder-decoders in `seq2seq.py`), and classification (`classify.py`).

Export's validation uses these too, so that what is checked is what runs on the device.
"""
