"""The device side: ONNX Runtime sessions, decoding with the KV cache, and text generation.

Export's validation uses these too, so that what is checked is what runs on the device.
"""
