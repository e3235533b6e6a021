"""``python -m sapp_compress`` (also what ``torchrun ... -m sapp_compress`` starts on every rank)."""
from .cli import main

main(prog_name="sapp-compress")
