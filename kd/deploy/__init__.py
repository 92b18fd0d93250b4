"""Deployment: the files a student ships as, and reading them back.

formats      FORMATS: one row per file type (writer, runner, kind); kind() and runner() of a file derive from it
timm_folder  the timm format: a save_for_hf folder, and its upload to the Hugging Face Hub
qat          quantization-aware training and INT8 conversion (torchao PT2E)
inference    every model evaluate.py reads behind one call (load_model), and the data a checkpoint was trained on
"""
