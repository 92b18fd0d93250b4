"""Deployment: the files a student ships as, and reading them back.

formats    FORMATS: one row per file type (writer, runner)
qat        quantization-aware training and INT8 conversion (torchao PT2E)
inference  every model evaluate.py reads behind one call (load_model)
"""
