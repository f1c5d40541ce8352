"""Sequence tasks for recurrent DNI, offering the runner's task interface (see `dni.data`)."""

from dni.tasks.copy import CopyTask, copy, repeat_copy
from dni.tasks.text import CharacterText, next_character, text

__all__ = ["CharacterText", "CopyTask", "copy", "next_character", "repeat_copy", "text"]
