"""evaluate.py's plots, drawn with PIL alone: confusion matrix, reliability diagram, per-class accuracy."""

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def confusion_image(confusion: list[list[int]], classes: list[str]) -> Image.Image:
    """Rows: true class, columns: predicted class; shade = share of the row; counts in cells that fit them."""
    k, font = len(classes), _font()
    cell, left, top = max(12, min(40, 480 // k)), 40, 40
    legend = max(font.getbbox(f"{i}: {c}")[2] for i, c in enumerate(classes)) + 20
    image = Image.new("RGB", (left + k * cell + legend, top + k * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 4), "predicted ->", fill="black", font=font)
    draw.text((2, top - 16), "true", fill="black", font=font)
    for i, row in enumerate(confusion):
        total = sum(row) or 1
        draw.text((left - 18, top + i * cell + cell // 2 - 6), str(i), fill="black", font=font)
        draw.text((left + i * cell + cell // 2 - 4, top - 16), str(i), fill="black", font=font)
        for j, count in enumerate(row):
            shade = int(255 * (1 - count / total))
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255), outline="#ddd")
            if cell >= 24 and count:
                draw.text((box[0] + 3, box[1] + cell // 2 - 6), str(count), fill="black" if shade > 128 else "white")
        draw.text((left + k * cell + 10, top + i * 16), f"{i}: {classes[i]}", fill="black", font=font)
    return image


def reliability_image(calibration: list[dict], ece: float, size: int = 320) -> Image.Image:
    """Accuracy per confidence bin (bars) against the diagonal of perfect calibration."""
    font, pad = _font(), 40
    image = Image.new("RGB", (size + 2 * pad, size + 2 * pad), "white")
    draw = ImageDraw.Draw(image)

    def xy(x: float, y: float) -> tuple[float, float]:
        return pad + x * size, pad + (1 - y) * size

    for b in calibration:
        if b["count"]:
            draw.rectangle((*xy(b["lower"], b["accuracy"]), *xy(b["upper"], 0)), fill="#4a7bd0", outline="white")
    draw.line((*xy(0, 0), *xy(1, 1)), fill="#c33", width=2)
    draw.rectangle((*xy(0, 1), *xy(1, 0)), outline="black")
    for x, y, text in ((-0.06, 1, "1"), (-0.06, 0.03, "0"), (0.98, -0.01, "1")):
        draw.text(xy(x, y), text, fill="black", font=font)
    draw.text((pad, 10), f"reliability: ECE {ece:.3f} ({len(calibration)} bins)", fill="black", font=font)
    draw.text((pad, size + pad + 8), "confidence (max softmax); bars: accuracy per bin", fill="black", font=font)
    return image


def per_class_image(accuracies: list[float | None], classes: list[str], width: int = 300) -> Image.Image:
    """One horizontal bar per class: its accuracy (recall)."""
    font, row = _font(), 20
    left = max(font.getbbox(c)[2] for c in classes) + 12
    image = Image.new("RGB", (left + width + 60, row * len(classes) + 10), "white")
    draw = ImageDraw.Draw(image)
    for i, (name, accuracy) in enumerate(zip(classes, accuracies)):
        y = 5 + i * row
        draw.text((4, y + 3), name, fill="black", font=font)
        if accuracy is not None:
            draw.rectangle((left, y + 2, left + accuracy * width, y + row - 3), fill="#4a7bd0")
        label = "-" if accuracy is None else f"{100 * accuracy:.1f}%"
        draw.text((left + width + 6, y + 3), label, fill="black", font=font)
    return image


def save_plots(out: Path, rows: dict[str, dict]) -> None:
    """The three plots of every row as PNG in <out>/plots, and as images in TensorBoard (<out>/tb)."""
    from torch.utils.tensorboard import SummaryWriter

    (out / "plots").mkdir(parents=True, exist_ok=True)
    with SummaryWriter(str(out / "tb")) as writer:
        for name, r in rows.items():
            classes = list(r["per_class_accuracy"])
            images = {
                "confusion": confusion_image(r["confusion"], classes),
                "reliability": reliability_image(r["calibration"], r["ece"]),
                "per_class": per_class_image(list(r["per_class_accuracy"].values()), classes),
            }
            stem = re.sub(r"[^\w.@-]", "_", name)  # a file name on any system
            for kind, image in images.items():
                image.save(out / "plots" / f"{stem}_{kind}.png")
                writer.add_image(f"{name}/{kind}", np.asarray(image), 0, dataformats="HWC")
