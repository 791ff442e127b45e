"""The runs a user asks for, built on the runtime: resolving a task's source model
(``sources``) and models named in the registry (``models``), the inputs of a job (``inputs``),
training (``train``), lifelong sequences (``lifelong``) and evaluation of a model or a folder
(``evaluation``).
"""
