"""The DeepSpeed boundary: the only package that imports deepspeed, lazily inside functions.

Modules: ``ds_config`` (pure builders of the engines' DeepSpeed dicts from ds_configs/ templates), ``teacher``
(TeacherEngine: ZeRO-3 inference with parameter offload, emits SupervisionPackets, attribution), ``student``
(StudentStage: a fresh ZeRO-2 engine per frontier stage), ``checkpoint`` (exact stage resume; safetensors +
JSON). Import the submodules directly; nothing here imports deepspeed at package import.
"""
