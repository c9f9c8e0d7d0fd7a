"""sa2va-dpo: preference and supervised fine-tuning of Sa2VA for vessel segmentation."""

__version__ = "0.1.0"
