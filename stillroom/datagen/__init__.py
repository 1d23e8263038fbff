"""Data made by a teacher: generations into a resumable store, their export to training files,
verifiers, self-data rewrites, draft-model data, preference pairs and MiniPLM's data selection.

Training methods live in :mod:`stillroom.methods`; this part produces the files they train on.
"""
