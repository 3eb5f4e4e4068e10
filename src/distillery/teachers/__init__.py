"""The teacher room: the :class:`Teacher` protocol and every backend. Each yields
:class:`distillery.targets.TeacherTargets`; nothing outside this room knows which backend runs.

- :mod:`.protocol`: ``Teacher``, and the shared vocabulary and device rules;
- :mod:`.open`: ``open_teacher(cfg.teacher, device)`` picks the backend from ``teacher.kind``;
- :mod:`.hf`: a live Hugging Face model in this process (folder, hub id, GGUF file, or ``smollm2``);
- :mod:`.cached`: a teacher cache written by ``distillery cache``;
- :mod:`.api_logprobs`: the stored top log-probs of a ``distillery generate`` data set;
- :mod:`.served`: a model behind an OpenAI-compatible server (vLLM, llama.cpp) scoring any sequence.
"""

from .cached import CachedTeacher
from .hf import HFTeacher, convert_gguf, distillery_home, load_teacher, pick_device, pick_dtype, smollm2_gguf
from .open import open_teacher, teacher_config
from .protocol import Teacher, TeacherUnavailable, run_device, shared_vocab, teacher_device

__all__ = ["CachedTeacher", "HFTeacher", "Teacher", "TeacherUnavailable", "convert_gguf", "distillery_home", "load_teacher", "open_teacher",
           "pick_device", "pick_dtype", "run_device", "shared_vocab", "smollm2_gguf", "teacher_config",
           "teacher_device"]
