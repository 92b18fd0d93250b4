"""Deployment: the files a student ships as (formats.FORMATS, the timm folder, INT8 through qat), and reading them
back (inference.load_model)."""
