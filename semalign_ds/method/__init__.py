"""The math of METHOD.md sections 1-6, pure torch (no deepspeed, transformers or logging imports).

Modules: ``basis`` (semantic bases, shared vocabulary, alignment map M), ``pairing`` (layer pairing
table), ``attribution`` (layer gradient x activation), ``objectives`` (layer and output losses),
``lora`` (low-rank adapters for the frontier layer). Import the submodules directly.
"""
