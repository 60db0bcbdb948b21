"""SAR-KD: distil an MoE teacher into a dense student while the teacher's routers learn."""

__version__ = "0.1.0"
