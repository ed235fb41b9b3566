"""Load a model for training: the checkpoint read tensor by tensor, the frozen (NF4) spectral-residual base with
LaMDA adapters, the prepared-layer cache, and every device and dtype decision (`device.py`).

    checkpoint.py  safetensors files, one tensor at a time; model keys -> checkpoint keys
    loader.py      `load_lamda_model`: skeleton on meta -> SVD -> residual -> NF4 -> device, layer by layer
    cache.py       the on-disk cache of prepared layers
    device.py      device, precision, compute dtype, quantization, peak memory
"""
