"""Teacher backends. Every backend yields :class:`distillery.targets.TeacherTargets`.

- :mod:`.hf`: a live Hugging Face model (folder, hub id, GGUF file, or the bundled ``smollm2``).
- the teacher cache (``distillery.cache``) and the served/API teacher (``distillery.api``) plug in
  with the same ``targets(batch)`` method.
"""

from .hf import Teacher, convert_gguf, distillery_home, load_teacher, pick_device, pick_dtype, smollm2_gguf

__all__ = ["Teacher", "convert_gguf", "distillery_home", "load_teacher", "pick_device", "pick_dtype", "smollm2_gguf"]
