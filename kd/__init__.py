"""kd: knowledge distillation from RGB+multispectral teachers into small RGB students. Subpackages by job, each
importing only those before it: data, models < distill < train (deploy and eval beside it); the scripts call them."""

__version__ = "0.2.0"  # pyproject.toml reads it (one place); 0.2: the layered package of issue 22
