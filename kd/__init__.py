"""kd: knowledge distillation from RGB+multispectral teachers into small RGB students."""
